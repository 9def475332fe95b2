"""The demo's train_lora through a real SLURM: a single-node cluster started on this machine
(tests/slurm/start_slurm.sh: Debian's slurm-wlm 22.05, slurmdbd on MariaDB for sacct, munge) and
snakemake-executor-plugin-slurm 2.8.0 with config/profiles/slurm (its GPU requests set to 0: the test node has
no GPU). Every job must show in sacct as COMPLETED, and the LoRA must equal a local run's (the session's shared
finished demo, tests/conftest.py). Skips, saying why, only where SLURM cannot be started (not root, no package
manager)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, scaled
from safetensors.torch import load_file
from test_workflow import edited_copy

pytestmark = [pytest.mark.workflow, pytest.mark.slurm]
BIN = Path(sys.executable).parent
GPU_RULES = (
    "latent_shard",
    "text_shard",
    "train_lora",
    "train_full",
    "train_controlnet",
    "train_segment",
    "evaluate_samples",
)


@pytest.fixture(scope="module")
def slurm() -> Iterator[None]:
    if shutil.which("sinfo") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    result = subprocess.run(
        ["bash", str(REPO / "tests/slurm/start_slurm.sh")], capture_output=True, text=True, timeout=scaled(600)
    )
    if result.returncode in (2, 3):  # not root, or the packages cannot be installed
        pytest.skip(f"cannot start SLURM here: {result.stdout.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr  # it can be started, so it must start
    started_here = "already running" not in result.stdout
    yield
    if started_here:  # the daemons this test started go with it (a cluster found running stays)
        stop = subprocess.run(["bash", str(REPO / "tests/slurm/stop_slurm.sh")], capture_output=True, text=True)
        assert stop.returncode == 0, stop.stdout + stop.stderr


def slurm_profile(dest: Path) -> Path:
    """config/profiles/slurm for this one-node test cluster: its partition, no account, no GPUs, quick polls, one
    thread a job (as the local run it is compared with: CPU matmuls split their sums by thread, so another count
    rounds differently)."""
    profile = yaml.safe_load((REPO / "config/profiles/slurm/config.yaml").read_text())
    profile.update(
        {
            "jobs": 4,
            "slurm-no-account": True,
            "slurm-init-seconds-before-status-checks": 1,  # the least: later checks add 10 s each
            "default-resources": {"slurm_partition": "cpu", "mem_mb": 2000, "runtime": 30},
        }
    )
    profile["set-resources"] = {rule: {"gpu": 0, "tasks_per_gpu": 0} for rule in GPU_RULES}
    profile["set-threads"] = {rule: 1 for rule in (*GPU_RULES, "dataset_manifest")}
    (dest / "profile").mkdir()
    (dest / "profile/config.yaml").write_text(yaml.safe_dump(profile))
    return dest / "profile"


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": f"{BIN}:/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": str(workdir),
        "XDG_CACHE_HOME": str(workdir / ".cache"),
    }
    return subprocess.run(
        [str(BIN / "snakemake"), *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=scaled(900)
    )


def test_demo_train_lora_runs_through_slurm_and_equals_a_local_run(
    slurm: None, finished_demo: tuple[Path, subprocess.CompletedProcess[str]], validated_models: Path, tmp_path: Path
) -> None:
    # from the session's validated demo models (each job wave on the cluster costs a status poll of about 10 s):
    # the dataset checkpoint, the shards, their indexes and the training run as SLURM jobs
    cluster = edited_copy(validated_models, tmp_path / "cluster")
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    # the demo's 200 steps in segments of 100 (a queue's wall-time limit): one train_segment job, then train_lora
    # resumes its state
    result = snakemake(
        cluster, "--profile", str(slurm_profile(tmp_path)), "train_lora", "--config", "train_segment_steps=100"
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    ran = int(re.findall(r"(\d+) of \d+ steps \(100%\) done", result.stdout + result.stderr)[-1])
    jobs = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-S", since, "--format=JobID,Comment,State,WorkDir"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    ours = [line.split("|") for line in jobs if line.split("|")[3].startswith(str(cluster))]
    rules = sorted(comment.split("_wildcards_")[0].removeprefix("rule_") for _, comment, _, _ in ours)
    assert len(ours) == ran and all(state == "COMPLETED" for _, _, state, _ in ours), jobs
    assert {"dataset_manifest", "latent_shard", "text_shard", "train_lora"} <= set(rules), rules
    assert rules.count("train_segment") == 1 and "demo_models" not in rules, rules  # (validated before)
    # one local job at --cores 1, no segments (the session's finished demo): the same LoRA, bit for bit, as the
    # cluster jobs ran at one thread each too
    local = finished_demo[0]
    a = load_file(str(cluster / "results/train/lora/demo_lora.safetensors"))
    b = load_file(str(local / "results/train/lora/demo_lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((cluster / "results/cache/latents/summary.json").read_text())
    assert summary["entries"] == 6
