"""The cache rules through Snakemake: incremental reruns by content, and a SIGKILL in the middle."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import NO_SLURM_PATH, REPO, dataset_toml, make_dataset, scaled
from PIL import Image
from safetensors import safe_open

pytestmark = pytest.mark.workflow
BIN = Path(sys.executable).parent
TARGETS = ("cache_latents", "cache_text_encoder_outputs")


def env(workdir: Path) -> dict[str, str]:
    return {
        "PATH": NO_SLURM_PATH,
        "HOME": str(workdir),
        "XDG_CACHE_HOME": str(workdir / ".cache"),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),  # this checkout's fluxpipe (not the one the environment has installed)
    }


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN / "snakemake"), "--cores", "2", *args, "--configfile", "test.yaml"]
    result = subprocess.run(cmd, cwd=workdir, env=env(workdir), capture_output=True, text=True, timeout=scaled(600))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def summaries(workdir: Path) -> tuple[dict, dict]:
    return tuple(json.loads((workdir / f"results/cache/{k}/summary.json").read_text()) for k in ("latents", "text"))


def setup_workdir(root: Path, n_images: int, latent_shards: int, validated: Path) -> Path:
    """A copy of ``validated`` (conftest's validated_models: the workflow with the demo models validated, no cache)
    with a dataset of ``n_images``."""
    shutil.copytree(validated, root, symlinks=True, dirs_exist_ok=True)  # keeps mtimes and Snakemake's records
    make_dataset(root / "data", n_images)
    dataset_toml(root / "data.toml", Path("data"))
    (root / "test.yaml").write_text(
        f"dataset_config: data.toml\ncache:\n  latent_shards: {latent_shards}\n  text_shards: 2\n  device: cpu\n"
    )
    return root


def image_of(folder: Path, i: int) -> Path:
    return next(p for p in folder.glob(f"img{i:04d}.*") if p.suffix != ".txt")


def test_dataset_edits_rerun_only_what_changed(validated_models: Path, tmp_path: Path) -> None:
    work = setup_workdir(tmp_path, 200, 4, validated_models)
    snakemake(work, *TARGETS)
    latents, text = summaries(work)
    assert (latents["encoded"], text["encoded"]) == (200, 5)
    data = work / "data"
    for i in (3, 10, 17):  # modify 3 images (same size, new pixels)
        path = image_of(data, i)
        Image.new("RGB", Image.open(path).size, (i, 200, 7)).save(path)
    for i in (0, 1):  # add 2 images with captions the dataset already has
        Image.new("RGB", (64, 64), (i, 1, 2)).save(data / f"extra{i}.png")
        (data / f"extra{i}.txt").write_text("a blue circle\n")
    image_of(data, 42).unlink()  # delete 1 image
    (data / "img0050.txt").write_text("a caption nobody else has\n")  # edit 1 caption
    snakemake(work, *TARGETS)
    latents, text = summaries(work)
    assert (latents["encoded"], latents["entries"], latents["dropped"]) == (5, 201, 4)
    assert (text["encoded"], text["entries"]) == (1, 6)
    again = snakemake(work, "-n", *TARGETS)
    assert "Nothing to be done" in again.stdout + again.stderr


def shard_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("shard-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def start_and_kill(workdir: Path, kill_snakemake: bool) -> list[Path]:
    """Start the caching run; once a latent shard is complete, SIGKILL either Snakemake itself (and its jobs)
    or only a running `fluxpipe cache-latents` job, as an out-of-memory killer or a wall-time limit would.
    Returns the shards that were complete before the kill."""
    import psutil

    shards = workdir / "results/cache/latents"
    cmd = [str(BIN / "snakemake"), "--cores", "1", *TARGETS, "--configfile", "test.yaml"]
    proc = subprocess.Popen(
        cmd, cwd=workdir, env=env(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + scaled(300)
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
        done = sorted(shards.glob("shard-*.safetensors"))
        if not done:
            continue
        if kill_snakemake:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return done
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                words = child.cmdline()
            except psutil.Error:  # a job that just ended
                continue
            if "cache-latents" in words and not Path(workdir / words[words.index("--out") + 1]).exists():
                child.kill()
                proc.wait()
                return done
    proc.kill()
    raise AssertionError("the run ended before a cache job could be killed")


def cache_tensors_equal(a_dir: Path, b_dir: Path) -> None:
    for kind in ("latents", "text"):
        a = shard_tensors(a_dir / "results/cache" / kind)
        b = shard_tensors(b_dir / "results/cache" / kind)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind


def test_sigkill_of_a_cache_job_then_plain_rerun_completes_equal(validated_models: Path, tmp_path: Path) -> None:
    from fluxpipe.io.shards import read_shard_metadata

    killed = setup_workdir(tmp_path / "killed", 60, 3, validated_models)
    done = start_and_kill(killed, kill_snakemake=False)  # kills the job building a later shard
    assert not (killed / "results/cache/latents/summary.json").exists()
    before = [read_shard_metadata(p)[1].build_id for p in done]
    snakemake(killed, *TARGETS)  # a plain rerun: the failed job left nothing behind
    assert [read_shard_metadata(p)[1].build_id for p in done] == before  # finished shards kept, not rebuilt
    clean = setup_workdir(tmp_path / "clean", 60, 3, validated_models)
    snakemake(clean, *TARGETS)
    cache_tensors_equal(killed, clean)


def test_sigkill_of_snakemake_then_unlock_and_rerun_incomplete(validated_models: Path, tmp_path: Path) -> None:
    from fluxpipe.io.shards import read_shard_metadata

    killed = setup_workdir(tmp_path / "killed", 60, 3, validated_models)
    done = start_and_kill(killed, kill_snakemake=True)
    # Snakemake's own bookkeeping after a SIGKILL: its lock, and outputs it marked incomplete. fluxpipe renames
    # an output into place as the job's last step, so a marked file is complete and rerunning it re-reads it.
    snakemake(killed, "--unlock", *TARGETS)
    snakemake(killed, *TARGETS, "--rerun-incomplete")
    assert all(read_shard_metadata(p)[1].encoded == 0 for p in done)  # finished before the kill: not re-encoded
    assert json.loads((killed / "results/cache/latents/summary.json").read_text())["entries"] == 60


def test_a_damaged_shard_is_deleted_by_the_index_and_a_plain_rerun_rebuilds_it(
    validated_models: Path, tmp_path: Path
) -> None:
    work = setup_workdir(tmp_path / "w", 6, 2, validated_models)
    snakemake(work, *TARGETS)
    shard = work / "results/cache/latents/shard-001.safetensors"
    expected = {k: v.clone() for k, v in shard_tensors(work / "results/cache/latents").items()}  # (mmap)
    data = bytearray(shard.read_bytes())
    for i in range(len(data) - 200, len(data) - 184):  # 16 bytes of tensor data flipped; the file's mtime moves
        data[i] ^= 0x5A
    shard.write_bytes(bytes(data))
    cmd = [str(BIN / "snakemake"), "--cores", "2", *TARGETS, "--configfile", "test.yaml"]
    failed = subprocess.run(cmd, cwd=work, env=env(work), capture_output=True, text=True, timeout=scaled(600))
    assert failed.returncode != 0 and not shard.exists()
    log = (work / "logs/cache_latents/index.log").read_text()
    assert "shard-001.safetensors: its bytes do not match" in log and "rerun the same snakemake command" in log
    snakemake(work, *TARGETS)  # exactly what the message says: the shard and the index are rebuilt
    rebuilt = shard_tensors(work / "results/cache/latents")
    assert rebuilt.keys() == expected.keys()
    worst = max(float((rebuilt[k] - expected[k]).abs().max()) for k in expected)
    assert worst < 1e-4, worst  # re-encoded (the damaged pool copy was not reused): equal up to rounding
    assert json.loads((work / "results/cache/latents/summary.json").read_text())["shards_rebuilt"] == [
        "shard-001.safetensors"
    ]
