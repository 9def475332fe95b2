"""Manifest, latent and text caches at the stage level: content addressing, reuse, equality, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import dataset_toml, make_dataset
from PIL import Image
from safetensors import safe_open

from fluxpipe.config.dataset import load_dataset_toml
from fluxpipe.errors import FluxpipeError
from fluxpipe.io.tables import read_parquet
from fluxpipe.stages import cache_index, cache_latents, cache_text, manifest
from fluxpipe.tools.demo import CLIP_DIR, FILES, T5_DIR

SHARDS = 3


def build(root: Path, toml: Path, demo: Path, batch: int = 4, n_shards: int = SHARDS) -> dict[str, dict]:
    """manifest -> shards -> indexes, as the Snakemake rules run them (shard outputs deleted first)."""
    out = root / "results"
    man = out / "manifest.parquet"
    manifest.run(
        manifest.ManifestConfig(
            datasets=load_dataset_toml(toml),
            out=man,
            latent_shards=n_shards,
            text_shards=n_shards,
            hash_cache=root / "h.json",
        )
    )
    summaries = {}
    for kind in ("latents", "text"):
        for old in (out / kind).glob("shard-*.safetensors"):
            old.unlink()  # shard files of an earlier shard count are no longer outputs
        shards = tuple(out / kind / f"shard-{k:03d}.safetensors" for k in range(n_shards))
        for k, shard in enumerate(shards):
            shard.unlink(missing_ok=True)  # Snakemake removes a job's outputs before it runs
            if kind == "latents":
                cache_latents.run(
                    cache_latents.CacheLatentsConfig(
                        manifest=man,
                        ae=demo / FILES["ae"],
                        out=shard,
                        shard=k,
                        hash_cache=root / "h.json",
                        batch_size=batch,
                    )
                )
            else:
                cache_text.run(
                    cache_text.CacheTextConfig(
                        manifest=man,
                        clip_l=demo / FILES["clip_l"],
                        t5xxl=demo / FILES["t5xxl"],
                        clip_tokenizer=demo / CLIP_DIR,
                        t5_tokenizer=demo / T5_DIR,
                        out=shard,
                        shard=k,
                        max_length=16,
                        hash_cache=root / "h.json",
                        batch_size=batch,
                    )
                )
        summaries[kind] = cache_index.run(
            cache_index.CacheIndexConfig(
                kind=kind,
                manifest=man,
                shards=shards,
                index=out / kind / "index.parquet",
                summary=out / kind / "summary.json",
            )
        )
    return summaries


def tensors(root: Path, kind: str) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted((root / "results" / kind).glob("shard-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_edits_encode_exactly_what_changed_and_equal_a_fresh_build(tmp_path: Path, demo_dir: Path) -> None:
    # batch 1: a batched convolution rounds differently from a single one (~1e-6), so only unbatched
    # encoding makes an incremental cache bit-identical to a fresh one; batching does not change the counts
    images = make_dataset(tmp_path / "data", 40)
    toml = dataset_toml(tmp_path / "ds.toml", tmp_path / "data")
    first = build(tmp_path, toml, demo_dir, batch=1)
    assert (first["latents"]["encoded"], first["text"]["encoded"]) == (40, 5)  # 5 distinct captions
    for p in images[:3]:  # modify 3 images
        Image.new("RGB", Image.open(p).size, (1, 2, 3)).save(p)
    for i in (1000, 1001):  # add 2 images whose captions exist already
        Image.new("RGB", (64, 64), (i % 256, 9, 9)).save(tmp_path / "data" / f"new{i}.png")
        (tmp_path / "data" / f"new{i}.txt").write_text("a red square")
    images[5].unlink()  # delete 1 image (its caption file stays: harmless)
    images[7].with_suffix(".txt").write_text("an edited caption\r\n")  # edit 1 caption
    second = build(tmp_path, toml, demo_dir, batch=1)
    assert (second["latents"]["encoded"], second["latents"]["dropped"]) == (5, 4)  # 3 old versions + 1 deleted
    assert (second["text"]["encoded"], second["text"]["dropped"]) == (1, 0)
    assert second["latents"]["entries"] == 41 and second["text"]["entries"] == 6

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    build(fresh, toml, demo_dir, batch=1)
    for kind in ("latents", "text"):
        a, b = tensors(tmp_path, kind), tensors(fresh, kind)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_resolution_change_reencodes_latents_not_text(tmp_path: Path, demo_dir: Path) -> None:
    make_dataset(tmp_path / "data", 6)
    build(tmp_path, dataset_toml(tmp_path / "a.toml", tmp_path / "data", 64), demo_dir)
    again = build(tmp_path, dataset_toml(tmp_path / "b.toml", tmp_path / "data", 96), demo_dir)
    assert again["latents"]["encoded"] == 6 and again["text"]["encoded"] == 0


def test_resharding_reencodes_nothing(tmp_path: Path, demo_dir: Path) -> None:
    make_dataset(tmp_path / "data", 12)
    toml = dataset_toml(tmp_path / "a.toml", tmp_path / "data")
    build(tmp_path, toml, demo_dir, n_shards=3)
    again = build(tmp_path, toml, demo_dir, n_shards=5)
    assert (again["latents"]["encoded"], again["text"]["encoded"]) == (0, 0)
    assert (again["latents"]["entries"], again["text"]["entries"]) == (12, 5)
    kept = sorted(p.name.split(".")[0] for p in (tmp_path / "results/latents/.reuse").glob("*.safetensors"))
    assert kept == [f"shard-{k:03d}" for k in range(5)]  # one generation per current shard after the index


def test_cached_latents_are_the_ae_posterior_of_the_cropped_image(tmp_path: Path, demo_dir: Path) -> None:
    from fluxpipe.data.images import load_rgb, resize_and_crop, to_tensor
    from fluxpipe.io.checkpoints import load_model

    make_dataset(tmp_path / "data", 2)
    build(tmp_path, dataset_toml(tmp_path / "ds.toml", tmp_path / "data"), demo_dir)
    table, _ = read_parquet(tmp_path / "results" / "manifest.parquet")
    row = table.iloc[0]
    index, _ = read_parquet(tmp_path / "results" / "latents" / "index.parquet")
    key = index[index.path == row.path].key.iloc[0]
    image = resize_and_crop(
        load_rgb(Path(row.path)),
        (row.resized_w, row.resized_h),
        row.crop_left,
        row.crop_top,
        (row.bucket_w, row.bucket_h),
    )
    ae = load_model(demo_dir / FILES["ae"], "ae", dtype=torch.float32)
    with torch.no_grad():
        mean, logvar = ae.encoder(to_tensor(image)[None]).chunk(2, dim=1)
    cached = tensors(tmp_path, "latents")
    assert cached[f"{key}.mean"].shape == (16, row.bucket_h // 8, row.bucket_w // 8)
    torch.testing.assert_close(cached[f"{key}.mean"], mean[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(cached[f"{key}.logvar"], logvar[0], rtol=0, atol=1e-5)


def _bad_dataset(folder: Path) -> None:
    make_dataset(folder, 4)
    (folder / "zero.png").write_bytes(b"")
    good = (folder / "img0001.png").read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    (folder / "text.jpg").write_text("not an image")
    Image.new("RGB", (64, 64)).save(folder / "nocaption.png")
    for name in ("zero", "cut", "text"):
        (folder / f"{name}.txt").write_text("caption")


def test_every_bad_file_is_listed_in_one_error(tmp_path: Path) -> None:
    _bad_dataset(tmp_path / "data")
    cfg = manifest.ManifestConfig(
        datasets=load_dataset_toml(dataset_toml(tmp_path / "d.toml", tmp_path / "data")),
        out=tmp_path / "m.parquet",
        latent_shards=2,
        text_shards=2,
    )
    with pytest.raises(FluxpipeError, match="4 bad dataset files") as err:
        manifest.run(cfg)
    for name in ("zero.png", "cut.png", "text.jpg", "nocaption.png"):
        assert name in str(err.value)
    assert "skip_bad_images" in str(err.value) and not (tmp_path / "m.parquet").exists()


def test_skip_bad_images_leaves_them_out(tmp_path: Path) -> None:
    _bad_dataset(tmp_path / "data")
    cfg = manifest.ManifestConfig(
        datasets=load_dataset_toml(dataset_toml(tmp_path / "d.toml", tmp_path / "data")),
        out=tmp_path / "m.parquet",
        latent_shards=2,
        text_shards=2,
        skip_bad_images=True,
    )
    table = manifest.run(cfg)
    assert sorted(Path(p).name for p in table.path) == ["img0000.jpg", "img0001.png", "img0002.jpg", "img0003.png"]
    _, meta = read_parquet(tmp_path / "m.parquet")
    assert len(json.loads(meta["fluxpipe.left_out"])) == 4


def test_odd_formats_and_captions_are_converted(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.new("I;16", (64, 64), 65535).save(folder / "deep.png")
    Image.new("P", (64, 64), 3).save(folder / "palette.png")
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(folder / "alpha.png")
    Image.new("RGB", (20, 20)).save(folder / "tiny.png")  # smaller than the smallest bucket: upscaled
    for p in folder.iterdir():
        p.with_suffix(".txt").write_bytes(b"\xef\xbb\xbf\r\n  a caption with a BOM\r\nsecond line\r\n")
    cfg = manifest.ManifestConfig(
        datasets=load_dataset_toml(dataset_toml(tmp_path / "d.toml", folder)),
        out=tmp_path / "m.parquet",
        latent_shards=2,
        text_shards=2,
    )
    table = manifest.run(cfg).set_index(table_key := "path")
    assert len(table) == 5 and set(table.caption) == {"a caption with a BOM"}
    tiny = table.loc[str(folder / "tiny.png")]
    assert bool(tiny.upscaled) and (tiny.bucket_w, tiny.bucket_h) == (64, 64), table_key


def test_too_small_without_upscaling_is_reported(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    make_dataset(folder, 2)
    Image.new("RGB", (8, 8)).save(folder / "speck.png")
    (folder / "speck.txt").write_text("a speck")
    toml = dataset_toml(tmp_path / "d.toml", folder, extra="bucket_no_upscale = true")
    cfg = manifest.ManifestConfig(
        datasets=load_dataset_toml(toml), out=tmp_path / "m.parquet", latent_shards=2, text_shards=2
    )
    with pytest.raises(FluxpipeError, match=r"1 bad dataset files: .*speck.png: 8x8 cannot be bucketed"):
        manifest.run(cfg)


def test_empty_dataset(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    cfg = manifest.ManifestConfig(
        datasets=load_dataset_toml(dataset_toml(tmp_path / "d.toml", tmp_path / "data")),
        out=tmp_path / "m.parquet",
        latent_shards=2,
        text_shards=2,
    )
    with pytest.raises(FluxpipeError, match="has no usable images"):
        manifest.run(cfg)


def test_validation_split_is_disjoint_and_seeded(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data", 20)
    toml = dataset_toml(tmp_path / "d.toml", tmp_path / "data", extra="validation_split = 0.25\nvalidation_seed = 3")
    cfg = manifest.ManifestConfig(
        datasets=load_dataset_toml(toml), out=tmp_path / "m.parquet", latent_shards=2, text_shards=2
    )
    first = manifest.run(cfg)
    assert (first.split == "val").sum() == 5 and (first.split == "train").sum() == 15
    assert list(manifest.run(cfg).split) == list(first.split)


def test_sharded_caches_equal_the_single_job_cache(tmp_path: Path, demo_dir: Path) -> None:
    make_dataset(tmp_path / "data", 9)
    toml = dataset_toml(tmp_path / "a.toml", tmp_path / "data")
    build(tmp_path / "one", toml, demo_dir, n_shards=1)
    build(tmp_path / "four", toml, demo_dir, n_shards=4)  # scatter over four shard jobs, then gather
    for kind in ("latents", "text"):
        single, gathered = tensors(tmp_path / "one", kind), tensors(tmp_path / "four", kind)
        assert single.keys() == gathered.keys() and len(single) > 0
        assert all(torch.equal(single[k], gathered[k]) for k in single)


def test_resize_interpolation_reaches_the_latent_entries(tmp_path: Path) -> None:
    """A subset's resize_interpolation (here from --resize_interpolation) is in the manifest row, the latent key
    and the pixels the AE sees: nearest doubles an 8x8 image into exact 2x2 blocks."""
    import numpy as np

    folder = tmp_path / "data"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "a.png")
    (folder / "a.txt").write_text("a")
    toml = tmp_path / "d.toml"
    toml.write_text(
        f"[general]\ncaption_extension = '.txt'\n[[datasets]]\nresolution = 16\n"
        f"[[datasets.subsets]]\nimage_dir = '{folder}'\n"
    )
    rows = {}
    for name, defaults in (("auto", None), ("nearest", {"resize_interpolation": "nearest"})):
        cfg = manifest.ManifestConfig(
            datasets=load_dataset_toml(toml, defaults), out=tmp_path / f"{name}.parquet", latent_shards=1, text_shards=1
        )
        rows[name] = manifest.run(cfg)
    assert list(rows["auto"].resize_interpolation) == [""] and list(rows["nearest"].resize_interpolation) == ["nearest"]
    ccfg = cache_latents.CacheLatentsConfig(manifest=tmp_path / "x", ae=tmp_path / "ae", out=tmp_path / "o", shard=0)
    (auto,) = cache_latents.latent_entries(rows["auto"], "ae-sha", ccfg)
    (nearest,) = cache_latents.latent_entries(rows["nearest"], "ae-sha", ccfg)
    assert nearest.interpolation == "nearest" and auto.interpolation == "" and nearest.key != auto.key
    blocks = torch.from_numpy(pixels.repeat(2, axis=0).repeat(2, axis=1)).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(cache_latents.prepare(nearest), blocks)
    assert not torch.equal(cache_latents.prepare(auto), blocks)  # lanczos blends neighbours
    from fluxpipe.workflow.cache import _shard_digests  # the pipeline re-encodes a latent shard when the filter changes

    digests = {name: _shard_digests(str(tmp_path / f"{name}.parquet"), 0, "latents") for name in rows}
    assert digests["auto"] != digests["nearest"]


def test_fine_tune_metadata_tags_join_the_caption(tmp_path: Path) -> None:
    """The reference's fine-tuning captions: caption + caption_separator + tags; tags alone without a caption."""
    folder = tmp_path / "data"
    make_dataset(folder, 3)
    meta = {
        "img0000.jpg": {"caption": "a photo", "tags": "red, square"},
        "img0001.png": {"tags": "blue, circle"},
        "img0002.jpg": {"caption": "only words", "tags": ""},
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "meta.jsonl").write_text(json.dumps({"image_path": "img0000.jpg", "caption": "x", "tags": "y"}) + "\n")
    toml = tmp_path / "d.toml"
    toml.write_text(
        f"[[datasets]]\nresolution = 64\nenable_bucket = true\nmin_bucket_reso = 32\nbucket_reso_steps = 16\n"
        f"[[datasets.subsets]]\nimage_dir = '{folder}'\nmetadata_file = '{tmp_path / 'meta.json'}'\n"
        f"[[datasets.subsets]]\nimage_dir = '{folder}'\nmetadata_file = '{tmp_path / 'meta.jsonl'}'\n"
        f"caption_separator = ' | '\n"
    )
    table = manifest.run(
        manifest.ManifestConfig(
            datasets=load_dataset_toml(toml), out=tmp_path / "m.parquet", latent_shards=1, text_shards=1
        )
    )
    assert list(table.caption) == ["a photo,red, square", "blue, circle", "only words", "x | y"]
