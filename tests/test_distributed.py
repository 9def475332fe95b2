"""Data-parallel LoRA training with torchrun on the CPU (gloo): 2 processes x batch 1 = 1 process x batch 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from conftest import REPO
from fluxpipe.distributed import World

BIN = Path(sys.executable).parent


def test_rows_split_a_batch_evenly() -> None:
    assert [World(r, 2).rows(4) for r in range(2)] == [[0, 1], [2, 3]]
    assert [World(r, 2).rows(3) for r in range(2)] == [[0, 1], [2]]
    assert [World(r, 2).rows(1) for r in range(2)] == [[0], []]
    assert [World(r, 3).rows(7) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]


def test_two_processes_train_the_lora_of_one_with_twice_the_batch(demo_dir: Path, tmp_path: Path) -> None:
    from test_train_lora import seed_command

    toml = (REPO / "config/demo/dataset.toml").read_text()
    per_process = tmp_path / "batch1.toml"
    per_process.write_text(toml.replace("batch_size = 2", "batch_size = 1"))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}

    def args(out: Path, dataset: Path) -> list[str]:
        a = seed_command(demo_dir, out, "--network_train_unet_only", "--optimizer_type", "AdamW", "--save_state")
        a[a.index("--dataset_config") + 1] = str(dataset)
        a[a.index("--mixed_precision") + 1] = "no"  # fp32: the two layouts differ only by float summation order
        return a

    one = subprocess.run([str(BIN / "fluxpipe"), "train", "lora", *args(tmp_path / "one", REPO / "config/demo/dataset.toml")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "fluxpipe.cli",
                          "train", "lora", *args(tmp_path / "two", per_process)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(str(tmp_path / "one/my_flux_lora.safetensors"))
    b = load_file(str(tmp_path / "two/my_flux_lora.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-5, worst
    assert any(a[k].abs().sum() > 0 for k in a if "lora_up" in k)
    assert not list((tmp_path / "two").glob("*.tmp*"))  # rank 0 alone wrote, atomically
    # the 2-process run's epoch-1 state, resumed by 1 process: the world size may change between runs
    state = tmp_path / "two/my_flux_lora-000001-state"
    resumed = subprocess.run([str(BIN / "fluxpipe"), "train", "lora", *args(tmp_path / "resumed",
                                                                          REPO / "config/demo/dataset.toml"),
                              "--resume", str(state)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-2000:]
    c = load_file(str(tmp_path / "resumed/my_flux_lora.safetensors"))
    assert max(float((a[k].float() - c[k].float()).abs().max()) for k in a) < 1e-5
