"""The Snakemake workflow end to end on the demo models, in a scratch copy of the repository."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.workflow
BIN = Path(sys.executable).parent


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(workdir), "XDG_CACHE_HOME": str(workdir / ".cache")}
    return subprocess.run([str(BIN / "snakemake"), "--cores", "1", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    for name in ("Snakefile", "rules", "config", "report"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    return tmp_path


def test_validate_models_on_the_demo_then_nothing_to_do(workdir: Path) -> None:
    first = snakemake(workdir, "validate_models")
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((workdir / "results/validate/models.json").read_text())
    assert report["variant"] == "dev" and set(report["models"]) == {"flux", "ae", "clip_l", "t5xxl"}
    again = snakemake(workdir, "validate_models")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_train_lora_on_the_demo(workdir: Path) -> None:
    result = snakemake(workdir, "train_lora")  # the README's main job
    assert result.returncode == 0, result.stderr[-3000:]
    for kind in ("latents", "text"):
        summary = json.loads((workdir / f"results/cache/{kind}/summary.json").read_text())
        assert summary["entries"] == 6 and summary["encoded"] == 6, summary
    lora = workdir / "results/train/lora/demo_lora.safetensors"
    losses = [json.loads(line) for line in (workdir / "results/train/lora/demo_lora-loss.jsonl").read_text().splitlines()]
    # 5 training images (one of 6 held out for validation) x 2 repeats / batch 2 = 5 steps x 20 epochs
    assert lora.is_file() and len(losses) == 100 and losses[-1]["step"] == 100
    validation = [json.loads(line) for line in
                  (workdir / "results/train/lora/demo_lora-validation.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in validation] == list(range(21)) and validation[-1]["loss"] < validation[0]["loss"]
    again = snakemake(workdir, "train_lora")
    assert "Nothing to be done" in again.stdout + again.stderr
    evaluate_then_report(workdir)


def evaluate_then_report(workdir: Path) -> None:
    """Rule evaluate_samples on the trained demo LoRA, then `snakemake --report` with every figure in it."""
    from PIL import Image

    result = snakemake(workdir, "evaluate_samples")
    assert result.returncode == 0, result.stderr[-3000:]
    out = workdir / "results/evaluate/demo_lora"
    pngs = [out / "grid.png", out / "loss.png", out / "validation_loss.png", out / "train_distance.png",
            *(out / "checkpoints" / f"{n}.png" for n in ("base", "epoch-000005", "epoch-000010", "epoch-000015",
                                                         "final"))]
    for png in pngs:
        with Image.open(png) as image:
            image.verify()
            assert image.format == "PNG"
    with Image.open(out / "grid.png") as grid:  # 5 columns (base, epochs 5/10/15, final) of 256-pixel images
        assert grid.width > 5 * 256 and grid.height > 4 * 256
    metrics = json.loads((out / "metrics.json").read_text())
    assert [c["label"] for c in metrics["checkpoints"]] == ["base", "epoch 5", "epoch 10", "epoch 15", "final"]
    assert [c["step"] for c in metrics["checkpoints"]] == [0, 25, 50, 75, 100]
    assert all(c["validation_loss"] is not None for c in metrics["checkpoints"])
    assert all(0 <= c["train_distance"] <= 1 for c in metrics["checkpoints"])  # RMS of pixels in [0, 1]
    report = snakemake(workdir, "--report", "report.html")
    assert report.returncode == 0, report.stderr[-3000:]
    html = (workdir / "report.html").read_text()
    for name in ("grid.png", "validation_loss.png", "loss.png", "train_distance.png", "metrics.json",
                 "epoch-000010.png"):
        assert name in html, name


def test_full_fine_tune_and_controlnet_rules_on_the_demo(workdir: Path) -> None:
    from safetensors import safe_open

    result = snakemake(workdir, "--cores", "2", "train_full", "train_controlnet")
    assert result.returncode == 0, result.stderr[-3000:]
    full = workdir / "results/train/full/demo_full.safetensors"
    controlnet = workdir / "results/train/controlnet/demo_controlnet.safetensors"
    check = subprocess.run([str(BIN / "fluxpipe"), "validate", "--flux", str(full)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    with safe_open(str(controlnet), "pt") as f:
        assert "controlnet_blocks.1.weight" in f.keys() and "input_hint_block.14.weight" in f.keys()
    assert (workdir / "results/train/full/demo_full-000002.safetensors").is_file()
    again = snakemake(workdir, "train_full", "train_controlnet")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_config_typo_fails_before_any_job(workdir: Path) -> None:
    cfg = workdir / "config" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("hash_cache:", "hash_cahce:"))
    result = snakemake(workdir, "-n", "validate_models")
    assert result.returncode != 0 and "unknown key(s) hash_cahce" in result.stdout + result.stderr


def test_bad_model_file_stops_the_pipeline_with_the_reason(workdir: Path) -> None:
    models = workdir / "models"
    models.mkdir()
    (models / "flux.safetensors").write_bytes(b"\x00" * 16)
    for name in ("ae", "clip", "t5"):
        (models / f"{name}.safetensors").write_bytes(b"")
    cfg = workdir / "config" / "config.yaml"
    text = cfg.read_text()
    for slot, name in (("flux", "flux"), ("ae", "ae"), ("clip_l", "clip"), ("t5xxl", "t5")):
        text = text.replace(f"  {slot}:", f"  {slot}: models/{name}.safetensors #", 1)
    cfg.write_text(text)
    result = snakemake(workdir, "validate_models")
    log = (workdir / "logs/validate_models.log").read_text()
    assert result.returncode != 0 and "fluxpipe: error: 4 model files are unusable" in log
    assert not (workdir / "results/validate/models.json").exists()


ACCEPTED_LINTS = (
    # the rules run the `fluxpipe` command of the environment Snakemake runs in (no per-rule conda env)
    "* Specify a conda environment or container",
    # CONFIG_ARGS only names the config files to read; the settings each job depends on are in its params
    "* Shell command directly uses variable CONFIG_ARGS",
)


def test_lint_has_no_findings_but_the_accepted_ones(workdir: Path) -> None:
    result = snakemake(workdir, "--lint")
    findings = [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.startswith("    * ")]
    assert findings and all(f.startswith(ACCEPTED_LINTS) for f in findings), findings


@pytest.mark.parametrize("command", [[], ["validate"], ["demo-models"]])
def test_help_of_every_command(command: list[str]) -> None:
    result = subprocess.run([str(BIN / "fluxpipe"), *command, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage: fluxpipe" in result.stdout


def test_train_processes_launch_torchrun(workdir: Path) -> None:
    result = snakemake(workdir, "-n", "-p", "train_lora", "train_full", "train_controlnet", "--config",
                       "train_processes=2")
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-2000:]
    for method in ("lora", "full", "controlnet"):
        assert f"torchrun --standalone --nproc-per-node 2 -m fluxpipe.cli train {method}" in text
    assert text.count("gpu=2") >= 3


def test_a_segmented_train_lora_equals_one_job(workdir: Path) -> None:
    from safetensors.torch import load_file

    segmented = snakemake(workdir, "-p", "train_lora", "--config", "train_segment_steps=40")
    assert segmented.returncode == 0, segmented.stderr[-3000:]
    log = segmented.stdout + segmented.stderr
    # 100 steps in jobs of 40: two segments, then the final job resuming the second
    assert log.count("rule train_segment:") == 2 and "--stop_at_step 80 --resume" in log, log[-3000:]
    assert "--resume results/train/lora/demo_lora-seg00000080-state" in log
    out = workdir / "results/train/lora"
    assert not list(out.glob("*-seg*-state"))  # temporary: deleted once the chain finished
    chained = {p.name: load_file(str(p)) for p in out.glob("demo_lora*.safetensors")}
    chained_losses = (out / "demo_lora-loss.jsonl").read_text()
    shutil.rmtree(out)
    single = snakemake(workdir, "train_lora")
    assert single.returncode == 0 and "rule train_segment:" not in single.stdout + single.stderr
    assert sorted(chained) == sorted(p.name for p in out.glob("demo_lora*.safetensors"))
    for name, tensors in chained.items():
        again = load_file(str(out / name))
        assert all(torch.equal(tensors[k], again[k]) for k in tensors), name
    assert [json.loads(x)["loss"] for x in chained_losses.splitlines()] == \
        [json.loads(x)["loss"] for x in (out / "demo_lora-loss.jsonl").read_text().splitlines()]


def test_segments_are_planned_from_max_train_steps() -> None:
    from fluxpipe.config import PipelineConfig
    from fluxpipe.workflow import previous_segment, segment_ends, segment_state

    cfg = PipelineConfig(train={"output_name": "x", "max_train_steps": 100}, train_segment_steps=40)
    assert segment_ends(cfg, "lora", "unused.parquet") == [40, 80]  # the final job runs steps 81-100
    assert segment_state(cfg, "lora", 80) == "results/train/lora/x-seg00000080-state"
    assert previous_segment(cfg, "lora", 80) == ["results/train/lora/x-seg00000040-state"]
    assert previous_segment(cfg, "lora", 40) == []
    with pytest.raises(ValueError, match="not a segment"):
        previous_segment(cfg, "lora", 50)
    cfg = PipelineConfig(train_full={"max_train_steps": 80}, train_segment_steps=40)
    assert segment_ends(cfg, "full", "unused.parquet") == [40]
    assert segment_ends(PipelineConfig(train={"max_train_steps": 80}), "lora", "unused.parquet") == []
