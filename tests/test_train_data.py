"""Training data from real caches: joining manifest and indexes, the epoch order, and posterior batches."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import dataset_toml
from PIL import Image

from fluxpipe.config.dataset import load_dataset_toml
from fluxpipe.data.batches import CachedTensors, TrainItem, epoch_batches, epoch_repeats, load_items, make_batch
from fluxpipe.errors import FluxpipeError
from fluxpipe.io.tables import read_parquet, write_parquet_atomic
from fluxpipe.stages import cache_index, cache_latents, cache_text, manifest
from fluxpipe.tools.demo import CLIP_DIR, FILES, T5_DIR

SIZES = [(64, 64)] * 4 + [(96, 64)] * 2  # two buckets: 64x64 and 80x48


def _images(folder: Path, sizes: list[tuple[int, int]], captions: list[str]) -> None:
    folder.mkdir(parents=True)
    for i, (w, h) in enumerate(sizes):
        image = Image.new("RGB", (w, h), (40 * i % 256, 90, 200 - 20 * i))
        image.putpixel((i, i), (255, 0, 0))
        image.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(captions[i % len(captions)] + "\n")


def _build(root: Path, demo: Path) -> dict[str, Path]:
    """6 training images (2 repeats, flip_aug) and 2 regularization images -> manifest, caches, indexes."""
    _images(root / "train", SIZES, ["a red square", "a blue circle", "a photo of a cat"])
    _images(root / "reg", [(64, 64)] * 2, ["a photo of a dog"])
    toml = dataset_toml(root / "ds.toml", root / "train", extra="num_repeats = 2\nflip_aug = true")
    with toml.open("a") as f:
        f.write(
            f'[[datasets.subsets]]\nimage_dir = "{root / "reg"}"\nis_reg = true\nnum_repeats = 1\nflip_aug = false\n'
        )
    out = root / "results"
    paths = {
        "manifest": out / "dataset" / "manifest.parquet",
        "latents": out / "cache" / "latents" / "index.parquet",
        "text": out / "cache" / "text" / "index.parquet",
    }
    manifest.run(
        manifest.ManifestConfig(
            datasets=load_dataset_toml(toml),
            out=paths["manifest"],
            latent_shards=2,
            text_shards=1,
            hash_cache=root / "h.json",
        )
    )
    common = {"manifest": paths["manifest"], "hash_cache": root / "h.json", "batch_size": 8}
    for kind, n in (("latents", 2), ("text", 1)):
        shards = tuple(paths[kind].parent / f"shard-{k:03d}.safetensors" for k in range(n))
        for k, shard in enumerate(shards):
            if kind == "latents":
                cache_latents.run(cache_latents.CacheLatentsConfig(ae=demo / FILES["ae"], out=shard, shard=k, **common))
            else:
                cache_text.run(
                    cache_text.CacheTextConfig(
                        clip_l=demo / FILES["clip_l"],
                        t5xxl=demo / FILES["t5xxl"],
                        clip_tokenizer=demo / CLIP_DIR,
                        t5_tokenizer=demo / T5_DIR,
                        out=shard,
                        shard=k,
                        max_length=16,
                        **common,
                    )
                )
        cache_index.run(
            cache_index.CacheIndexConfig(
                kind=kind,
                manifest=paths["manifest"],
                shards=shards,
                index=paths[kind],
                summary=paths[kind].with_name("summary.json"),
            )
        )
    return paths


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> dict[str, Path]:
    return _build(tmp_path_factory.mktemp("train_data"), demo_dir)


@pytest.fixture(scope="module")
def items(caches: dict[str, Path]) -> list[TrainItem]:
    return load_items(caches["manifest"], caches["latents"], caches["text"])


def test_load_items_finds_every_row(caches: dict[str, Path], items: list[TrainItem]) -> None:
    table, _ = read_parquet(caches["manifest"])
    assert [it.row for it in items] == list(range(len(table))) and len(items) == 8
    latent_keys = set(read_parquet(caches["latents"])[0].key)
    text_keys = set(read_parquet(caches["text"])[0].key)
    for it in items:
        row = table.iloc[it.row]
        assert it.bucket == (row.bucket_w, row.bucket_h) and (it.is_reg, it.repeats) == (row.is_reg, row.repeats)
        assert len(it.latent_keys) == (1 if it.is_reg else 2) and set(it.latent_keys) <= latent_keys
        assert it.text_key in text_keys
    assert {it.bucket for it in items} == {(64, 64), (80, 48)}
    assert load_items(caches["manifest"], caches["latents"], caches["text"], split="val") == []


def test_epoch_repeats_and_reg_rebalancing(items: list[TrainItem]) -> None:
    # 6 training images x 2 repeats = 12: the 2 reg images (1 repeat each) are raised to 6 each
    assert epoch_repeats(items) == [6 if it.is_reg else 2 for it in items]

    def item(reg: bool, repeats: int, dataset: int = 0) -> TrainItem:
        return TrainItem(
            row=0, dataset=dataset, latent_keys=("k",), text_key="t", bucket=(64, 64), is_reg=reg, repeats=repeats
        )

    # the reference: reg images past the training count are left out; per dataset; no training images, no reg
    assert epoch_repeats([item(False, 3), item(True, 2), item(True, 2), item(True, 2)]) == [3, 2, 2, 0]
    assert epoch_repeats([item(False, 5), item(True, 1), item(True, 1)]) == [5, 3, 2]
    assert epoch_repeats([item(True, 4, dataset=1), item(False, 1)]) == [0, 1]


def test_epoch_batches_order(items: list[TrainItem]) -> None:
    batches = epoch_batches(items, 3, epoch=1, seed=42)
    seen = Counter(i for b in batches for i in b)
    assert [seen[i] for i in range(len(items))] == epoch_repeats(items)
    assert all(len({(items[i].dataset, items[i].bucket) for i in b}) == 1 for b in batches)
    per_bucket = Counter(items[b[0]].bucket for b in batches)
    full = Counter(items[b[0]].bucket for b in batches if len(b) == 3)
    assert all(1 <= len(b) <= 3 for b in batches) and all(per_bucket[k] - full[k] <= 1 for k in per_bucket)
    assert len(batches) == 7 + 2  # 64x64: 4·2 + 2·6 reg = 20 -> 7 batches; 80x48: 2·2 = 4 -> 2
    assert epoch_batches(items, 3, epoch=1, seed=42) == batches
    assert epoch_batches(items, {0: 3}, epoch=1, seed=42) == batches
    assert epoch_batches(items, 3, epoch=2, seed=42) != batches
    assert epoch_batches(items, 3, epoch=1, seed=43) != batches
    assert max(len(b) for b in epoch_batches(items, 50, epoch=0, seed=0)) == 20
    with pytest.raises(ValueError, match="dataset 0"):
        epoch_batches(items, {1: 3}, epoch=0, seed=0)


def test_make_batch_samples_the_posterior(caches: dict[str, Path], items: list[TrainItem]) -> None:
    square = [i for i, it in enumerate(items) if it.bucket == (64, 64)]
    batch_indices = [i for i in square if not items[i].is_reg][:3] + [next(i for i in square if items[i].is_reg)]
    generator = torch.Generator().manual_seed(7)
    clone = torch.Generator().manual_seed(0)
    clone.set_state(generator.get_state())
    with CachedTensors(caches["latents"], caches["text"]) as tensors:
        batch = make_batch(items, batch_indices, tensors, generator, "cpu", torch.float32)
        w, h = items[batch_indices[0]].bucket
        assert batch["latents"].shape == (4, 16, h // 8, w // 8) and batch["indices"] == batch_indices
        u = torch.rand(4, generator=clone)
        eps = torch.randn(4, 16, h // 8, w // 8, generator=clone)
        for b, i in enumerate(batch_indices):
            flipped = len(items[i].latent_keys) == 2 and bool(u[b] < 0.5)
            assert bool(batch["flipped"][b]) == flipped and bool(batch["is_reg"][b]) == items[i].is_reg
            mean, logvar = tensors.latent(items[i].latent_keys[int(flipped)])
            expected = 0.3611 * (mean.float() + torch.exp(logvar.float() / 2) * eps[b] - 0.1159)
            torch.testing.assert_close(batch["latents"][b], expected, rtol=1e-6, atol=1e-6)
            assert not torch.equal(batch["latents"][b], 0.3611 * (mean.float() - 0.1159))  # noise was added
            pooled, t5, mask = tensors.text(items[i].text_key)
            assert torch.equal(batch["pooled"][b], pooled.float()) and torch.equal(batch["t5"][b], t5.float())
            assert torch.equal(batch["t5_mask"][b], mask.bool())
        assert batch["pooled"].shape == (4, pooled.shape[0]) and batch["t5"].shape == (4, *t5.shape)
        assert batch["t5_mask"].shape == (4, 16) and batch["t5"].dtype == torch.float32
        assert set(batch["flipped"][:3].tolist()) == {True, False}  # seed 7 uses both entries of flip_aug items
        two_buckets = [next(i for i, it in enumerate(items) if it.bucket == k) for k in ((64, 64), (80, 48))]
        with pytest.raises(AssertionError, match="mixes buckets"):
            make_batch(items, two_buckets, tensors, generator, "cpu", torch.float32)
        with pytest.raises(FluxpipeError, match="rerun the cache rules"):
            tensors.latent("0" * 64)


@pytest.mark.parametrize("kind", ["latents", "text"])
def test_missing_cache_entry_is_an_error(caches: dict[str, Path], tmp_path: Path, kind: str) -> None:
    index, meta = read_parquet(caches[kind])
    stale = tmp_path / "index.parquet"
    write_parquet_atomic(index.iloc[1:], stale, meta)
    paths = {**caches, kind: stale}
    with pytest.raises(FluxpipeError, match="rerun the cache rules"):
        load_items(paths["manifest"], paths["latents"], paths["text"])
