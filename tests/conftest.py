"""Shared fixtures: tiny demo model files (written once per session), helpers to write test checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

torch.set_num_threads(1)  # tests may run beside other work on a 2-core machine

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REPO = Path(__file__).resolve().parents[1]
# PATH of the tests' local Snakemake runs: tests/no_slurm first (its `scontrol` fails at once: without it, every
# Snakemake start spends ~9 s in the SLURM plugin's `scontrol show config` where SLURM is installed but not running)
NO_SLURM_PATH = f"{REPO / 'tests/no_slurm'}:{Path(sys.executable).parent}:/usr/bin:/bin"


def timeout_factor() -> float:
    """How much longer than on an idle 2-core machine a subprocess may take: FLUXPIPE_TEST_TIMEOUT_FACTOR when set,
    else from the load on the machine at the start of the session (1 when idle, 8 under a load of 14 on 2 cores)."""
    if os.environ.get("FLUXPIPE_TEST_TIMEOUT_FACTOR"):
        return float(os.environ["FLUXPIPE_TEST_TIMEOUT_FACTOR"])
    return max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1) + 1.0)


TIMEOUT_FACTOR = timeout_factor()


def scaled(seconds: float) -> float:
    """A subprocess timeout of ``seconds`` on an idle machine, scaled to this one (see ``timeout_factor``)."""
    return seconds * TIMEOUT_FACTOR


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _checkout_entries() -> set[str] | None:
    """Untracked and ignored entries of the checkout (folders collapsed), or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return {line[3:] for line in out.stdout.splitlines() if "__pycache__" not in line and ".pytest_cache" not in line}


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_clean() -> Iterator[None]:
    """Tests write under tmp_path only: a file or folder that appears in the checkout during the session fails it."""
    before = _checkout_entries()
    yield
    after = _checkout_entries()
    if before is not None and after is not None:
        assert not after - before, f"the tests wrote into the checkout: {sorted(after - before)}"


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fluxpipe.tools.demo import write_demo_models

    out = tmp_path_factory.mktemp("demo_models")
    write_demo_models(out)
    return out


@pytest.fixture(scope="session")
def finished_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One finished demo project (`snakemake --cores 1 train_lora`, then evaluate_samples), shared by the whole
    session: the tests that edit or rerun it each work on their own copy (test_workflow.edited_copy), and
    tests/test_slurm.py compares its cluster-trained LoRA with this one's."""
    from test_workflow import copy_repo, snakemake

    work = copy_repo(tmp_path_factory.mktemp("demo"))
    result = snakemake(work, "train_lora")  # the README's main job
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = snakemake(work, "evaluate_samples")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    return work, result


@pytest.fixture(scope="session")
def validated_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A scratch copy of the workflow in which `snakemake validate_models` ran (the demo models written and
    validated, with Snakemake's records of them), and that run: the tests about what comes after it start from a
    copy of it (test_workflow.edited_copy) rather than each writing and hashing the demo models again (~11 s a
    run)."""
    from test_workflow import copy_repo, snakemake

    work = copy_repo(tmp_path_factory.mktemp("validated"))
    result = snakemake(work, "validate_models")
    assert result.returncode == 0, result.stderr[-3000:]
    return work, result


@pytest.fixture(scope="session")
def validated_models(validated_run: tuple[Path, subprocess.CompletedProcess[str]]) -> Path:
    """validated_run's workflow (never changed in place: copy it)."""
    return validated_run[0]


def write_st(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file for a test (plain, non-atomic: the code under test reads it)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


CAPTIONS = ["a red square", "a blue circle", "a green field", "a photo of a cat", "a small house"]


def make_dataset(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n small images of varied sizes and formats with caption files (captions from a pool of five)."""
    import random

    from PIL import Image

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = rng.choice([(64, 64), (96, 64), (64, 96), (80, 48), (120, 72)])
        color = tuple(rng.randrange(256) for _ in range(3))
        image = Image.new("RGB", (w, h), color)
        image.putpixel((rng.randrange(w), rng.randrange(h)), (255 - color[0], 0, 0))
        path = folder / f"img{i:04d}.{'png' if i % 2 else 'jpg'}"
        image.save(path)
        path.with_suffix(".txt").write_text(CAPTIONS[i % len(CAPTIONS)] + "\n")
        paths.append(path)
    return paths


def dataset_toml(path: Path, image_dir: Path, resolution: int = 64, extra: str = "") -> Path:
    path.write_text(f"""[general]
caption_extension = ".txt"
[[datasets]]
resolution = {resolution}
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 16
{extra}
[[datasets.subsets]]
image_dir = "{image_dir}"
""")
    return path


def tiny_lora_argv(demo: Path, toml: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """`fluxpipe train lora` on the demo models: rank 4, ``steps`` steps in fp32, seed 5, output ``out/lora``."""
    from fluxpipe.tools.demo import CLIP_DIR, FILES, T5_DIR

    return [
        "train",
        "lora",
        *("--pretrained_model_name_or_path", str(demo / FILES["flux"]), "--clip_l", str(demo / FILES["clip_l"])),
        *("--t5xxl", str(demo / FILES["t5xxl"]), "--ae", str(demo / FILES["ae"]), "--dataset_config", str(toml)),
        *("--output_dir", str(out), "--output_name", "lora", "--network_module", "networks.lora_flux"),
        *("--network_dim", "4", "--max_train_steps", str(steps), "--mixed_precision", "no", "--seed", "5"),
        *("--clip_tokenizer", str(demo / CLIP_DIR), "--t5_tokenizer", str(demo / T5_DIR)),
        *extra,
    ]
