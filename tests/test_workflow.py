"""The Snakemake workflow end to end on the demo models, in a scratch copy of the repository."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import NO_SLURM_PATH, REPO, scaled

pytestmark = pytest.mark.workflow
BIN = Path(sys.executable).parent


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": NO_SLURM_PATH,
        "HOME": str(workdir),
        "XDG_CACHE_HOME": str(workdir / ".cache"),
        "PYTHONPATH": str(REPO),  # this checkout's fluxpipe (not the one the environment has installed)
    }
    return subprocess.run(
        [str(BIN / "snakemake"), "--cores", "1", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(900),
    )


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    return copy_repo(tmp_path)


def test_validate_models_on_the_demo_then_nothing_to_do(validated_run: tuple, tmp_path: Path) -> None:
    validated, first = validated_run  # `snakemake validate_models` in a fresh copy of the workflow
    assert ran_jobs(first) == {"demo_models": 1, "validate_models": 1}, first.stderr[-3000:]
    report = json.loads((validated / "results/validate/models.json").read_text())
    assert report["variant"] == "dev" and set(report["models"]) == {"flux", "ae", "clip_l", "t5xxl"}
    workdir = edited_copy(validated, tmp_path / "work")  # Snakemake's records travel with the copy
    again = snakemake(workdir, "validate_models")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def copy_repo(dest: Path) -> Path:
    for name in ("Snakefile", "rules", "config", "report"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name)
    return dest


def edited_copy(finished: Path, dest: Path) -> Path:
    shutil.copytree(finished, dest, symlinks=True)  # keeps mtimes and Snakemake's records
    return dest


def test_train_lora_on_the_demo(finished_demo: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    workdir, result = finished_demo
    for kind in ("latents", "text"):
        summary = json.loads((workdir / f"results/cache/{kind}/summary.json").read_text())
        assert summary["entries"] == 6 and summary["encoded"] == 6, summary
    lora = workdir / "results/train/lora/demo_lora.safetensors"
    losses = [
        json.loads(line) for line in (workdir / "results/train/lora/demo_lora-loss.jsonl").read_text().splitlines()
    ]
    # 5 training flags (one of 6 held out for validation) x 4 repeats / batch 2 = 10 steps x 20 epochs
    assert lora.is_file() and len(losses) == 200 and losses[-1]["step"] == 200
    validation = [
        json.loads(line)
        for line in (workdir / "results/train/lora/demo_lora-validation.jsonl").read_text().splitlines()
    ]
    assert [r["epoch"] for r in validation] == list(range(21)) and validation[-1]["loss"] < validation[0]["loss"]
    again = snakemake(workdir, "-n", "train_lora", "evaluate_samples")
    assert "Nothing to be done" in again.stdout + again.stderr
    evaluate_then_report(workdir)


def ran_jobs(result: subprocess.CompletedProcess[str]) -> dict[str, int]:
    """rule -> jobs that a run (or a dry run) lists."""
    names = re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):$", result.stdout + result.stderr, re.M)
    return {n: names.count(n) for n in sorted(set(names))}


def results_state(work: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in (work / "results").rglob("*")}


def dry_run(work: Path, *targets: str) -> dict[str, int]:
    """`snakemake -n`: the jobs it plans; it writes nothing under results/."""
    before = results_state(work)
    result = snakemake(work, "-n", *targets)
    assert result.returncode == 0, result.stderr[-3000:]
    assert results_state(work) == before
    return ran_jobs(result)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def test_other_model_files_rerun_exactly_what_uses_them(finished_demo: tuple, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    work = edited_copy(finished_demo[0], tmp_path / "work")
    models = work / "models"  # copies of the demo's files, but an AE of another seed
    shutil.copytree(work / "results/demo_models", models)
    demo1 = subprocess.run(
        [str(BIN / "fluxpipe"), "demo-models", str(tmp_path / "seed1"), "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=scaled(900),
    )
    assert demo1.returncode == 0, demo1.stderr
    shutil.copy(tmp_path / "seed1/ae.safetensors", models / "ae.safetensors")
    cfg = work / "config/config.yaml"
    for slot, path in (
        ("flux", "flux1-dev.safetensors"),
        ("ae", "ae.safetensors"),
        ("clip_l", "clip_l.safetensors"),
        ("t5xxl", "t5xxl_fp16.safetensors"),
        ("clip_tokenizer", "tokenizers/clip-vit-large-patch14"),
        ("t5_tokenizer", "tokenizers/t5-v1_1-xxl"),
    ):
        edit(cfg, f"  {slot}:", f"  {slot}: models/{path} #")
    text_shards = {p: p.stat().st_mtime_ns for p in (work / "results/cache/text").glob("shard-*")}
    lora = work / "results/train/lora/demo_lora.safetensors"
    old = load_file(str(lora))
    assert dry_run(work, "train_lora") == {"validate_models": 1}  # the rest is planned once it has run
    result = snakemake(work, "train_lora", "evaluate_samples")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ran_jobs(result) == {
        "cache_latents": 1,
        "evaluate_samples": 1,
        "latent_shard": 1,  # cache.latent_shards auto: one job for six images
        "train_lora": 1,
        "validate_models": 1,
    }
    assert json.loads((work / "results/cache/latents/summary.json").read_text())["encoded"] == 6
    assert {p: p.stat().st_mtime_ns for p in text_shards} == text_shards  # text encoders unchanged: not rerun
    new = load_file(str(lora))
    assert any(not torch.equal(old[k], new[k]) for k in old)  # retrained on the new AE's latents
    assert dry_run(work, "train_lora", "evaluate_samples") == {}


def test_hash_cache_edit_reruns_the_validation_only(finished_demo: tuple, tmp_path: Path) -> None:
    work = edited_copy(finished_demo[0], tmp_path / "work")
    edit(work / "config/config.yaml", "hash_cache:", "hash_cache: elsewhere.json #")
    result = snakemake(work, "train_lora", "evaluate_samples")
    assert result.returncode == 0 and ran_jobs(result) == {"validate_models": 1}, result.stderr[-3000:]
    assert (work / "elsewhere.json").is_file()


def test_settings_edits_rerun_exactly_the_jobs_using_them(finished_demo: tuple, tmp_path: Path) -> None:
    evaluation = edited_copy(finished_demo[0], tmp_path / "evaluate")
    edit(evaluation / "config/config.yaml", "  seeds: [0, 1]", "  seeds: [3]")
    assert dry_run(evaluation, "train_lora", "evaluate_samples") == {"evaluate_samples": 1}
    result = snakemake(evaluation, "train_lora", "evaluate_samples")
    assert result.returncode == 0 and ran_jobs(result) == {"evaluate_samples": 1}, result.stderr[-3000:]
    training = edited_copy(finished_demo[0], tmp_path / "train")
    edit(training / "config/config.yaml", "  learning_rate: 0.001", "  learning_rate: 0.002")
    assert dry_run(training, "train_lora", "evaluate_samples") == {"evaluate_samples": 1, "train_lora": 1}
    dataset = edited_copy(finished_demo[0], tmp_path / "dataset")
    (dataset / "config/demo/flags/images/red_white_flag.txt").write_text("a red and white flag with stripes\n")
    targets = ("cache_latents", "cache_text_encoder_outputs")
    result = snakemake(dataset, *targets)
    assert result.returncode == 0, result.stderr[-3000:]
    ran = ran_jobs(result)  # the old caption's shard and the new one's (the same one, or two)
    assert ran.pop("text_shard") in (1, 2) and ran == {"cache_text_encoder_outputs": 1, "dataset_manifest": 1}
    assert json.loads((dataset / "results/cache/text/summary.json").read_text())["encoded"] == 1
    assert dry_run(dataset, "train_lora") == {"train_lora": 1}  # new text outputs: the LoRA is trained again


def test_a_dry_run_writes_nothing(workdir: Path) -> None:
    result = snakemake(workdir, "-n", "train_lora", "evaluate_samples")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (workdir / "results").exists()


def evaluate_then_report(workdir: Path) -> None:
    """Rule evaluate_samples' figures of the trained demo LoRA, then `snakemake --report` with every one in it."""
    from PIL import Image

    out = workdir / "results/evaluate/demo_lora"
    pngs = [
        out / "grid.png",
        out / "loss.png",
        out / "validation_loss.png",
        out / "train_distance.png",
        *(out / "checkpoints" / f"{n}.png" for n in ("base", "epoch-000005", "epoch-000010", "epoch-000015", "final")),
    ]
    for png in pngs:
        with Image.open(png) as image:
            image.verify()
            assert image.format == "PNG"
    with Image.open(out / "grid.png") as grid:  # 5 columns (base, epochs 5/10/15, final) of 64-pixel images
        assert grid.width > 5 * 64 and grid.height > 6 * 64  # rows: 3 prompts x 2 seeds
    metrics = json.loads((out / "metrics.json").read_text())
    assert [c["label"] for c in metrics["checkpoints"]] == ["base", "epoch 5", "epoch 10", "epoch 15", "final"]
    assert [c["step"] for c in metrics["checkpoints"]] == [0, 50, 100, 150, 200]
    assert all(c["validation_loss"] is not None for c in metrics["checkpoints"])
    assert all(0 <= c["train_distance"] <= 1 for c in metrics["checkpoints"])  # RMS of pixels in [0, 1]
    report = snakemake(workdir, "--report", "report.html")
    assert report.returncode == 0, report.stderr[-3000:]
    html = (workdir / "report.html").read_text()
    for name in (
        "grid.png",
        "validation_loss.png",
        "loss.png",
        "train_distance.png",
        "metrics.json",
        "epoch-000010.png",
    ):
        assert name in html, name


def test_full_fine_tune_and_controlnet_rules_then_every_run_report(finished_demo: tuple, tmp_path: Path) -> None:
    from safetensors import safe_open

    workdir = edited_copy(finished_demo[0], tmp_path / "work")  # the demo's caches and trained LoRA
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
    reports = snakemake(workdir, "run_reports")
    assert reports.returncode == 0, reports.stderr[-3000:]
    assert ran_jobs(reports) == {
        "run_report_lora": 1,
        "run_report_full": 1,
        "run_report_controlnet": 1,
        "run_reports": 1,
    }
    for method, title in (("lora", "LoRA"), ("full", "Full fine-tune"), ("controlnet", "ControlNet")):
        page = (workdir / f"results/report/{method}/run.html").read_text()
        assert f"<h1>{title} run: demo_{method}</h1>" in page and "<th>seed</th><td>42</td>" in page, method
        assert (workdir / f"results/report/{method}/dataset.png").is_file()
    assert "sample distance to training images" in (workdir / "results/report/lora/run.html").read_text()


def test_config_typo_fails_before_any_job(workdir: Path) -> None:
    cfg = workdir / "config" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("hash_cache:", "hash_cahce:"))
    result = snakemake(workdir, "-n", "validate_models")
    # the one line and exit status 2, as from `fluxpipe` itself
    assert result.returncode == 2 and "fluxpipe: error: config: unknown key(s) hash_cahce" in result.stderr, (
        result.stderr
    )


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
    assert "fluxpipe: error: 4 model files are unusable" in log
    # in the terminal too (not only in logs/), with the exit status of `fluxpipe validate` itself
    assert result.returncode == 2 and "fluxpipe: error: 4 model files are unusable" in result.stderr, result.stderr
    assert not (workdir / "results/validate/models.json").exists()


ACCEPTED_LINTS = (
    # the rules run the `fluxpipe` command of the environment Snakemake runs in (no per-rule conda env)
    "* Specify a conda environment or container",
)


def test_lint_has_no_findings_but_the_accepted_ones(workdir: Path) -> None:
    result = snakemake(workdir, "--lint")
    findings = [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.startswith("    * ")]
    assert findings and all(f.startswith(ACCEPTED_LINTS) for f in findings), findings


@pytest.mark.parametrize("command", [[], ["validate"], ["demo-models"]])
def test_help_of_every_command(command: list[str]) -> None:
    result = subprocess.run(
        [str(BIN / "fluxpipe"), *command, "--help"], capture_output=True, text=True, timeout=scaled(60)
    )
    assert result.returncode == 0 and "usage: fluxpipe" in result.stdout


def test_train_processes_launch_torchrun(workdir: Path) -> None:
    result = snakemake(
        workdir, "-n", "-p", "train_lora", "train_full", "train_controlnet", "--config", "train_processes=2"
    )
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-2000:]
    for method in ("lora", "full", "controlnet"):
        assert f"torchrun --standalone --nproc-per-node 2 -m fluxpipe.cli train {method}" in text
    assert text.count("gpu=2") >= 3


def test_a_segmented_train_lora_equals_one_job(finished_demo: tuple, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    single = finished_demo[0] / "results/train/lora"  # the shared demo's LoRA: one job
    work = edited_copy(finished_demo[0], tmp_path / "work")  # its caches, without its training
    shutil.rmtree(work / "results/train/lora")
    segmented = snakemake(work, "-p", "train_lora", "--config", "train_segment_steps=80")
    assert segmented.returncode == 0, segmented.stderr[-3000:]
    log = segmented.stdout + segmented.stderr
    # the demo's 200 steps (5 images x 4 repeats / batch 2 x 20 epochs) in jobs of 80: two segments, then the final
    # job (steps 161-200) resuming the second
    assert log.count("rule train_segment:") == 2 and "--stop_at_step 160 --resume" in log, log[-3000:]
    assert "--resume results/train/lora/demo_lora-seg00000160-state" in log
    assert "rule latent_shard:" not in log and "rule text_shard:" not in log  # the caches were kept
    out = work / "results/train/lora"
    assert not list(out.glob("*-seg*-state"))  # temporary: deleted once the chain finished
    chained = {p.name: load_file(str(p)) for p in out.glob("demo_lora*.safetensors")}
    assert sorted(chained) == sorted(p.name for p in single.glob("demo_lora*.safetensors"))
    for name, tensors in chained.items():
        again = load_file(str(single / name))
        assert all(torch.equal(tensors[k], again[k]) for k in tensors), name
    assert [json.loads(x)["loss"] for x in (out / "demo_lora-loss.jsonl").read_text().splitlines()] == [
        json.loads(x)["loss"] for x in (single / "demo_lora-loss.jsonl").read_text().splitlines()
    ]


def test_auto_shard_counts_follow_the_dataset(tmp_path: Path) -> None:
    from conftest import dataset_toml

    from fluxpipe.config.pipeline import load_pipeline
    from fluxpipe.config.typed import ConfigError
    from fluxpipe.workflow import shard_count

    def count(n: int) -> tuple[int, int]:
        images = tmp_path / f"images{n}"
        images.mkdir()
        for i in range(n):  # empty files are enough: the count lists folders only
            (images / f"{i:05d}.png").touch()
        (images / "notes.txt").touch()
        cfg = load_pipeline({"dataset_config": str(dataset_toml(tmp_path / f"d{n}.toml", images))})
        return shard_count(cfg, "latents"), shard_count(cfg, "text")

    assert count(6) == (1, 1) and count(500) == (1, 1) and count(501) == (2, 2) and count(1700) == (4, 4)
    assert count(9000) == (16, 16)  # at most 16 jobs
    with pytest.raises(ConfigError, match="cache.latent_shards: 'many' is neither auto nor a whole number"):
        load_pipeline({"cache": {"latent_shards": "many"}})
    with pytest.raises(ConfigError, match="cache.text_shards: 0 is neither auto nor a whole number of at least 1"):
        load_pipeline({"cache": {"text_shards": 0}})
    assert shard_count(load_pipeline({"cache": {"latent_shards": 3}}), "latents") == 3


def test_segments_are_planned_from_max_train_steps() -> None:
    from fluxpipe.config.pipeline import PipelineConfig
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


def write_report(path: Path, **sha: str) -> str:
    models = {s: {"sha256": sha.get(s, s)} for s in ("flux", "ae", "clip_l", "t5xxl")}
    tokenizers = {k: {"path": "x", "sha256": sha[k]} for k in ("clip_tokenizer", "t5_tokenizer") if k in sha}
    path.write_text(json.dumps({"models": models, "tokenizers": tokenizers, "seconds": 1.0}))
    return str(path)


def test_settings_digests_name_only_the_files_a_rule_uses(tmp_path: Path) -> None:
    from fluxpipe.config.pipeline import EvaluateConfig, PipelineConfig
    from fluxpipe.workflow import evaluate_params, latent_params, text_params, train_params, validated_digests

    base = write_report(tmp_path / "a.json", clip_tokenizer="c1")
    assert validated_digests(base) == {
        "flux": "flux",
        "ae": "ae",
        "clip_l": "clip_l",
        "t5xxl": "t5xxl",
        "clip_tokenizer": "c1",
        "t5_tokenizer": "hub",
    }
    other_ae = write_report(tmp_path / "b.json", clip_tokenizer="c1", ae="ae2")
    other_tok = write_report(tmp_path / "c.json", clip_tokenizer="c2")
    cfg = PipelineConfig()
    assert latent_params(cfg, other_ae) != latent_params(cfg, base) == latent_params(cfg, other_tok)
    assert text_params(cfg, other_tok) != text_params(cfg, base) == text_params(cfg, other_ae)
    for params in (train_params, evaluate_params):
        assert len({params(cfg, base), params(cfg, other_ae), params(cfg, other_tok)}) == 3
    seeds = PipelineConfig(evaluate=EvaluateConfig(seeds=(3,)))
    assert evaluate_params(seeds, base) != evaluate_params(cfg, base)
    assert train_params(seeds, base) == train_params(cfg, base) and latent_params(seeds, base) == latent_params(
        cfg, base
    )


def test_failed_jobs_show_their_error_line_or_their_last_lines(tmp_path: Path) -> None:
    from fluxpipe.workflow import failure_lines

    bad = tmp_path / "bad.log"
    bad.write_text("INFO loading\nfluxpipe: error: x.safetensors: truncated; download it again\n")
    bug = tmp_path / "bug.log"
    bug.write_text("".join(f"line {i}\n" for i in range(10)) + "ZeroDivisionError: division by zero\n")
    assert failure_lines([str(bad)]) == (
        [f"{bad}:", "  fluxpipe: error: x.safetensors: truncated; download it again"],
        True,
    )
    lines, bad_input = failure_lines([str(bad), str(bug)], tail=2)
    assert lines[2:] == [f"{bug}:", "  line 9", "  ZeroDivisionError: division by zero"] and not bad_input
    assert failure_lines([]) == ([], False)


def test_kontext_lora_on_the_paired_demo_then_samples_with_the_reference(
    validated_models: Path, tmp_path: Path
) -> None:
    """`snakemake train_lora evaluate_samples` with train.model_type: kontext: the demo flags paired with their
    edge maps (conditioning_data_dir), reference latents in the cache, samples made with the reference image."""
    import yaml
    from PIL import Image

    workdir = edited_copy(validated_models, tmp_path / "work")  # the demo models, validated: no cache yet

    config = workdir / "config/config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["train"].update(model_type="kontext", max_train_epochs=2, save_every_n_epochs=1)
    cfg["evaluate"].update(
        prompts=["a cat"],
        seeds=[0],
        width=64,
        height=64,
        steps=2,
        reference_image="config/demo/conditioning/cat.png",
        reference_size="target",
    )
    config.write_text(yaml.safe_dump(cfg))
    result = snakemake(workdir, "train_lora", "evaluate_samples")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((workdir / "results/cache/latents/summary.json").read_text())
    assert summary["entries"] == 12, summary  # 6 flags + their 6 reference edge maps
    assert (workdir / "results/train/lora/demo_lora.safetensors").is_file()
    out = workdir / "results/evaluate/demo_lora/checkpoints"
    with Image.open(out / "final.png") as final:
        with_reference = final.tobytes()
    cfg["evaluate"]["reference_image"] = "config/demo/conditioning/brick.png"  # another reference: other samples
    config.write_text(yaml.safe_dump(cfg))
    again = snakemake(workdir, "evaluate_samples", "--forcerun", "evaluate_samples")
    assert again.returncode == 0, again.stderr[-3000:]
    with Image.open(out / "final.png") as final:
        assert final.tobytes() != with_reference


def test_augmented_captions_masks_and_reg_images_train_a_lora(validated_models: Path, tmp_path: Path) -> None:
    """One run of the modes the caches used to refuse: shuffled / dropped captions (cached variants), a reg subset
    with alpha masks, --prior_loss_weight and differential output preservation, and --masked_loss masks from
    conditioning images."""
    import yaml
    from PIL import Image

    workdir = edited_copy(validated_models, tmp_path / "work")  # the demo models, validated: no cache yet

    reg = workdir / "config/demo/reg"
    reg.mkdir()
    for name in ("cat", "coffee"):  # RGBA copies: their left half is opaque, the right half transparent
        with Image.open(workdir / f"config/demo/images/{name}.jpg") as img:
            rgba = img.convert("RGBA")
        alpha = Image.new("L", rgba.size, 0)
        alpha.paste(255, (0, 0, rgba.size[0] // 2, rgba.size[1]))
        rgba.putalpha(alpha)
        rgba.save(reg / f"{name}.png")
    (workdir / "config/demo/dataset.toml").write_text(
        '[general]\ncaption_extension = ".txt"\nresolution = 256\nbatch_size = 2\nenable_bucket = true\n'
        "min_bucket_reso = 128\nmax_bucket_reso = 512\nbucket_reso_steps = 64\n"
        "[[datasets]]\n"
        '  [[datasets.subsets]]\n  image_dir = "config/demo/images"\n  shuffle_caption = true\n'
        "  keep_tokens = 1\n  caption_separator = ' '\n  caption_dropout_rate = 0.2\n"
        "  caption_dropout_every_n_epochs = 2\n"
        '  [[datasets.subsets]]\n  image_dir = "config/demo/reg"\n  is_reg = true\n  alpha_mask = true\n'
        '  class_tokens = "a photo"\n  custom_attributes = { diff_output_preservation = true }\n'
        "[[datasets]]\n"
        '  [[datasets.subsets]]\n  image_dir = "config/demo/images"\n'
        '  conditioning_data_dir = "config/demo/conditioning"\n'
    )
    config = workdir / "config/config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["dataset_config"] = "config/demo/dataset.toml"  # the photos (the demo's default is the flags)
    cfg["train"].pop("save_every_n_epochs")
    cfg["train"].update(max_train_epochs=2, prior_loss_weight=0.5, masked_loss=True)
    config.write_text(yaml.safe_dump(cfg))
    result = snakemake(workdir, "train_lora")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workdir / "results/train/lora/demo_lora.safetensors").is_file()
    import pandas as pd

    (index,) = (workdir / "results/cache/latents").glob("*.parquet")
    kinds = pd.read_parquet(index).kind.fillna("").value_counts().to_dict()
    assert kinds["mask:alpha"] == 2 and kinds["mask:conditioning"] == 6, kinds  # reg alpha, the edge maps
    text = json.loads((workdir / "results/cache/text/summary.json").read_text())
    assert text["entries"] > 6 + 1, text  # the shuffled variants and the empty caption beside the plain ones
    again = snakemake(workdir, "-n", "train_lora")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_rules_declare_their_threads(workdir: Path) -> None:
    """Training, the manifest and evaluation take what --cores allows; the shard jobs share it (the demo's six
    images: one latent and one text shard, cache.*_shards auto)."""
    result = snakemake(workdir, "-n", "--cores", "8", "train_lora")
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-2000:]
    jobs = {}
    for block in re.split(r"\n(?=(?:local)?(?:rule|checkpoint) )", text):
        head = re.match(r"(?:local)?(?:rule|checkpoint) (\w+):", block)
        if head:
            found = re.search(r"\n\s+threads: (\d+)", block)
            jobs.setdefault(head[1], set()).add(int(found[1]) if found else 1)
    assert jobs["train_lora"] == {8} and jobs["dataset_manifest"] == {8}, jobs
    assert jobs["latent_shard"] == {8} and jobs["text_shard"] == {8}, jobs  # 8 cores / 1 shard
    assert jobs["validate_models"] == {1} and jobs["demo_models"] == {1}, jobs


def test_uncached_text_and_latents_in_the_pipeline_train_a_lora(finished_demo: tuple, tmp_path: Path) -> None:
    """train: cache_text_encoder_outputs / cache_latents false: the LoRA's training encodes each step's captions
    (token warm-up, which no cache can follow) and random_crop images itself, on the demo's caches; with uncached
    text a T5 LoRA (network_args train_t5xxl=True) trains beside the DiT's."""
    import yaml
    from safetensors import safe_open

    work = edited_copy(finished_demo[0], tmp_path / "work")
    toml = work / "config/demo/flags/dataset.toml"
    edit(toml, "  num_repeats = 4", "  num_repeats = 4\n  random_crop = true\n  token_warmup_step = 4")
    config = work / "config/config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["train"].pop("save_every_n_epochs")
    cfg["train"].update(max_train_epochs=1, cache_latents=False, cache_text_encoder_outputs=False)
    cfg["train"].update(network_train_unet_only=False, network_args=["train_t5xxl=True"])
    config.write_text(yaml.safe_dump(cfg))
    result = snakemake(work, "train_lora")
    assert result.returncode == 0, result.stderr[-3000:]
    with safe_open(str(work / "results/train/lora/demo_lora.safetensors"), "pt") as f:
        prefixes = {k.split("_")[1] for k in f.keys()}
    assert prefixes == {"unet", "te1", "te3"}, prefixes  # the DiT's, CLIP-L's and T5's LoRA
    log = (work / "logs/train_lora.log").read_text()
    assert "uncached text: the text encoders encode each step's captions" in log, log[-2000:]
    assert "uncached latents: the AE encodes the random_crop / color_aug subsets' images each step" in log
    assert (work / "results/train/lora/demo_lora.safetensors").is_file()
    cfg["train"].update(cache_latents=True)  # random_crop with the latent cache: one line from the manifest on
    config.write_text(yaml.safe_dump(cfg))
    refused = snakemake(work, "train_lora")
    assert refused.returncode != 0
    assert "random_crop = True" in refused.stdout + refused.stderr and "turn cache_latents off" in (
        refused.stdout + refused.stderr
    )


def test_the_manifest_refuses_an_uncacheable_subset_only_when_every_method_caches() -> None:
    from fluxpipe.config.pipeline import load_pipeline
    from fluxpipe.workflow import cached_by_every_method

    lora = {"network_module": "networks.lora_flux"}
    both = load_pipeline({"train": {**lora, "cache_latents": True}, "train_full": {"cache_latents": True}})
    assert cached_by_every_method(both, "cache_latents")
    assert not cached_by_every_method(both, "cache_text_encoder_outputs")  # absent: the reference's default, off
    one_off = load_pipeline({"train": {**lora, "cache_latents": True}, "train_full": {"cache_latents": False}})
    assert not cached_by_every_method(one_off, "cache_latents")
    assert cached_by_every_method(load_pipeline({}), "cache_latents")  # no training section: strict
