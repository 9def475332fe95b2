"""Cache shards and training states are verified by content: flipped bytes with size and mtime kept are caught."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import dataset_toml, make_dataset
from safetensors import safe_open
from test_caches import build

from fluxpipe.data.batches import CachedTensors
from fluxpipe.errors import FluxpipeError
from fluxpipe.io.shards import ShardStats, build_shard, new_build_id, reuse_dir, write_shard
from fluxpipe.stages import cache_index
from fluxpipe.training.state import TrainState, load_state, save_state


def flip(path: Path, count: int, at: float = 0.7) -> None:
    """Flip ``count`` bytes inside the data, keeping the size and the mtime (the issue's damage)."""
    stat = path.stat()
    start = int(stat.st_size * at)
    with open(path, "r+b") as f:
        f.seek(start)
        data = bytearray(f.read(count))
        f.seek(start)
        f.write(bytes(b ^ 0x5A for b in data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def entries(n: int) -> dict[str, dict[str, torch.Tensor]]:
    return {f"k{i}": {"mean": torch.full((4, 8), float(i)), "logvar": torch.zeros(4, 8)} for i in range(n)}


def test_a_damaged_reuse_file_is_not_reused(tmp_path: Path) -> None:
    shard = tmp_path / "shard-000.safetensors"
    info = {f"k{i}": {"i": i} for i in range(3)}
    write_shard(
        shard, entries(3), info, ShardStats(encoded=3, reused=0, dropped=0, seconds=0.0, build_id=new_build_id())
    )
    flip(shard, 16)  # the .reuse hard link shares the inode: the pool copy is damaged too
    shard.unlink()
    asked: list[str] = []

    def encode(keys: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        asked.extend(keys)
        return {k: v for k, v in entries(3).items() if k in keys}

    stats = build_shard(shard, info, encode)
    assert sorted(asked) == ["k0", "k1", "k2"] and stats.reused == 0
    with safe_open(str(shard), "pt") as f:
        assert all(torch.equal(f.get_tensor(f"k{i}.mean"), torch.full((4, 8), float(i))) for i in range(3))
    assert len(list(reuse_dir(shard).glob("*.safetensors"))) == 1  # the damaged one deleted, the new one linked


@pytest.fixture()
def caches(tmp_path: Path, demo_dir: Path) -> Path:
    make_dataset(tmp_path / "img", 3)
    build(tmp_path, dataset_toml(tmp_path / "d.toml", tmp_path / "img"), demo_dir, n_shards=1)
    return tmp_path / "results"


def _index(results: Path, kind: str) -> cache_index.CacheIndexConfig:
    return cache_index.CacheIndexConfig(
        kind=kind,
        manifest=results / "manifest.parquet",
        shards=(results / kind / "shard-000.safetensors",),
        index=results / kind / "index.parquet",
        summary=results / kind / "s.json",
    )


@pytest.mark.parametrize(("kind", "count"), [("latents", 16), ("text", 64)])
def test_gather_deletes_a_damaged_shard_and_says_rerun(caches: Path, kind: str, count: int) -> None:
    shard = caches / kind / "shard-000.safetensors"
    flip(shard, count)
    with pytest.raises(
        FluxpipeError,
        match=r"1 \w+ cache shards were damaged and have been deleted .*shard-000"
        r".*do not match the sha256.*rerun the same snakemake command",
    ):
        cache_index.run(_index(caches, kind))
    assert not shard.exists()  # so Snakemake's rerun rebuilds exactly this shard


def test_gather_deletes_a_truncated_shard(caches: Path) -> None:
    shard = caches / "latents" / "shard-000.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(FluxpipeError, match="unreadable.*truncated.*rerun the same snakemake command"):
        cache_index.run(_index(caches, "latents"))
    assert not shard.exists()


@pytest.mark.parametrize("kind", ["latents", "text"])
def test_training_refuses_a_shard_damaged_after_indexing(caches: Path, kind: str) -> None:
    shard = caches / kind / "shard-000.safetensors"
    flip(shard, 16)
    tensors = CachedTensors(caches / "latents" / "index.parquet", caches / "text" / "index.parquet")
    key = next(k for k, p in tensors._where.items() if p == shard)
    with pytest.raises(
        FluxpipeError,
        match=rf"shard-000.safetensors: its bytes do not match .*delete it \(rm {shard}\)"
        " and rerun the same snakemake command",
    ):
        tensors.latent(key) if kind == "latents" else tensors.text(key)


def _state(folder: Path) -> Path:
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    save_state(
        TrainState(
            step=1,
            epoch=0,
            batch_in_epoch=1,
            weights=dict(model.state_dict()),
            optimizer=opt.state_dict(),
            scheduler={},
        ),
        folder,
    )
    return folder / "tensors.safetensors"


def test_damaged_state_names_the_file_and_the_fix(tmp_path: Path) -> None:
    tensors = _state(tmp_path / "run-state")
    flip(tensors, 16, at=0.9)
    with pytest.raises(
        FluxpipeError,
        match=rf"^{tensors}: does not match the sha256 recorded in .*state.json "
        rf"\(damaged\): delete {tmp_path / 'run-state'}",
    ):
        load_state(tmp_path / "run-state")


def test_missing_state_tensors_are_one_clear_error(tmp_path: Path) -> None:
    tensors = _state(tmp_path / "run-state")
    tensors.unlink()
    with pytest.raises(FluxpipeError, match=rf"^{tensors}: missing .*delete {tmp_path / 'run-state'}"):
        load_state(tmp_path / "run-state")
