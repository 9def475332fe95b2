"""The run report (`fluxpipe run-report`, rules run_report_*): settings, model files with sha256, per-epoch timings,
curves, validation loss per grid column, metrics and the dataset preview, checked against hand-computed values."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, dataset_toml, make_dataset, write_st
from PIL import Image

from fluxpipe.cli import main
from fluxpipe.config.dataset import load_dataset_toml
from fluxpipe.errors import FluxpipeError
from fluxpipe.io.run_files import epoch_timings, read_jsonl, saved_files
from fluxpipe.stages import manifest, run_report


def _records() -> list[dict]:
    """Six steps in two epochs; the job was resumed before step 5 (elapsed_s restarts)."""
    rows = [(1, 0, 1.0, 2.0, 100.0), (2, 0, 0.8, 4.0, 120.0), (3, 0, 0.6, 7.0, 110.0)]
    rows += [(4, 1, 0.5, 9.0, 130.0), (5, 1, 0.4, 3.0, 90.0), (6, 1, 0.3, 6.0, None)]
    return [
        {"step": s, "epoch": e, "loss": loss, "lr": 1e-3 * s, "elapsed_s": t, "peak_memory_mb": m}
        for s, e, loss, t, m in rows
    ]


def test_epoch_timings_by_hand() -> None:
    first, second = epoch_timings(_records())
    # epoch 1: steps took 2, 2, 3 s; epoch 2: 2 s, then the resumed job's own 3 s, then 3 s
    assert (first.epoch, first.steps, first.wall_s, first.peak_memory_mb) == (1, 3, 7.0, 120.0)
    assert first.s_per_step == pytest.approx(7 / 3) and first.mean_loss == pytest.approx(0.8)
    assert (second.epoch, second.steps, second.wall_s, second.peak_memory_mb) == (2, 3, 8.0, 130.0)
    assert second.mean_loss == pytest.approx(0.4)


def test_a_broken_loss_log_names_its_line(tmp_path: Path) -> None:
    log = tmp_path / "x-loss.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss"\n')
    with pytest.raises(FluxpipeError, match=r"x-loss.jsonl:2: not a JSON record"):
        read_jsonl(log)


@pytest.fixture
def run_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A finished run as the trainer leaves it (two per-epoch files, the final one, the logs) and its manifest."""
    train = tmp_path / "train"
    train.mkdir()
    weights = {"w": torch.ones(2, 2)}
    for name, steps, epoch in (("run-000001", 3, 1), ("run-000002", 6, 2), ("run", 6, 2)):
        meta = {"ss_steps": str(steps), "ss_epoch": str(epoch), "fluxpipe_settings": "abc123"}
        write_st(train / f"{name}.safetensors", weights, meta)
    (train / "run-loss.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    val = [(0, 0, 1.25), (3, 1, 0.75), (6, 2, 0.5)]
    (train / "run-validation.jsonl").write_text(
        "".join(json.dumps({"step": s, "epoch": e, "loss": v, "by_sigma": {"0.5": v}}) + "\n" for s, e, v in val)
    )
    images = tmp_path / "images"
    make_dataset(images, 5)
    toml = dataset_toml(tmp_path / "d.toml", images, extra="validation_split = 0.2\nvalidation_seed = 0")
    parquet = tmp_path / "manifest.parquet"
    manifest.run(manifest.ManifestConfig(datasets=load_dataset_toml(toml), out=parquet, latent_shards=1, text_shards=1))
    return train, parquet


def _config(train: Path, parquet: Path | None, out: Path, **kw: object) -> run_report.RunReportConfig:
    return run_report.RunReportConfig(
        method=str(kw.pop("method", "lora")),
        train_dir=train,
        output_name="run",
        out=out,
        settings=(("learning rate", "0.001"), ("seed", "42")),
        model_files=(("flux", train / "run-000001.safetensors"),),
        manifest=parquet,
        **kw,  # type: ignore[arg-type]
    )


def _cells(page: str, header: str) -> list[str]:
    """The cells of the key-value row named ``header``."""
    m = re.search(rf"<tr><th>{re.escape(header)}</th>(.*?)</tr>", page)
    assert m, header
    return re.findall(r"<td[^>]*>(.*?)</td>", m.group(1))


def test_report_of_a_finished_run(run_folder: tuple[Path, Path], tmp_path: Path) -> None:
    train, parquet = run_folder
    out = tmp_path / "report"
    result = run_report.run(_config(train, parquet, out))
    assert result["files"] == ["run.html", "curves.png", "dataset.png"]
    page = (out / "run.html").read_text()
    assert _cells(page, "seed") == ["42"] and _cells(page, "method") == ["LoRA"]
    assert _cells(page, "steps run") == ["6"] and _cells(page, "epochs run") == ["2"]
    assert _cells(page, "wall time (training steps)") == ["15.0 s (0.2 min)"]  # 7 s + 8 s
    assert _cells(page, "mean s/step") == ["2.5"] and _cells(page, "peak memory") == ["130 MiB"]
    # model files: each hashed (no validate report given), the final file last
    for f in ("run-000001.safetensors", "run.safetensors"):
        assert hashlib.sha256((train / f).read_bytes()).hexdigest() in page
    # per epoch: epoch, steps, wall, s/step, peak, mean loss
    assert '<td class="num">2</td><td class="num">3</td><td class="num">8</td>' in page
    # validation loss per saved file, step 0 first
    rows = re.findall(r"<tr><td>(before training|epoch 1|epoch 2|final)</td>(.*?)</tr>", page)
    assert [(label, re.findall(r">([^<]*)</td>", cells)) for label, cells in rows] == [
        ("before training", ["0", "0", "1.25"]),
        ("epoch 1", ["3", "1", "0.75"]),
        ("epoch 2", ["6", "2", "0.5"]),
        ("final", ["6", "2", "0.5"]),
    ]
    assert _cells(page, "validation loss, lowest (at step)") == ["0.5 (step 6)"]
    assert _cells(page, "training loss, first step") == ["1"] and _cells(page, "training loss, lowest") == ["0.3"]
    # the dataset: 5 images, one held out (validation_split 0.2), repeats 1
    assert _cells(page, "training images") == ["4"] and _cells(page, "held-out images (validation split)") == ["1"]
    assert page.count('src="data:image/png;base64,') == 2  # curves and preview embedded: the page stands alone
    for png, size in (("curves.png", (1100, 700)), ("dataset.png", None)):
        image = Image.open(io.BytesIO((out / png).read_bytes()))
        assert image.format == "PNG" and (size is None or image.size == size)
    preview = Image.open(out / "dataset.png").convert("RGB")
    assert preview.width >= 5 * 128  # five thumbnails side by side, no tiny grid
    assert not list(out.glob("*.tmp*"))


def test_the_validate_report_s_sha256_is_used(run_folder: tuple[Path, Path], tmp_path: Path) -> None:
    train, _ = run_folder
    known = {"models": {"flux": {"path": str(train / "run-000001.safetensors"), "sha256": "f" * 64}}}
    report = tmp_path / "models.json"
    report.write_text(json.dumps(known))
    run_report.run(_config(train, None, tmp_path / "r", validate_report=report))
    page = (tmp_path / "r/run.html").read_text()
    assert "f" * 64 in page  # not rehashed: the validate stage's figure
    assert "no dataset manifest given" in page


def test_a_lora_report_takes_evaluate_s_grid_columns(run_folder: tuple[Path, Path], tmp_path: Path) -> None:
    train, _ = run_folder
    metrics = tmp_path / "metrics.json"
    columns = [("base", 0, 0, 1.3, 0.9), ("epoch 1", 3, 1, 0.7, 0.4), ("final", 6, 2, 0.5, 0.2)]
    metrics.write_text(
        json.dumps(
            {
                "checkpoints": [
                    {"label": c, "step": s, "epoch": e, "validation_loss": v, "train_distance": d}
                    for c, s, e, v, d in columns
                ]
            }
        )
    )
    run_report.run(_config(train, None, tmp_path / "r", metrics=metrics))
    page = (tmp_path / "r/run.html").read_text()
    assert "sample distance to training images" in page
    assert re.search(
        r"<tr><td>epoch 1</td><td class=\"num\">3</td><td class=\"num\">1</td>"
        r"<td class=\"num\">0.7</td><td class=\"num\">0.4</td></tr>",
        page,
    )


@pytest.mark.parametrize("method", ["full", "controlnet"])
def test_every_method_has_a_report(run_folder: tuple[Path, Path], tmp_path: Path, method: str) -> None:
    train, parquet = run_folder
    run_report.run(_config(train, parquet, tmp_path / method, method=method))
    page = (tmp_path / method / "run.html").read_text()
    title = {"full": "Full fine-tune run: run", "controlnet": "ControlNet run: run"}[method]
    assert f"<h1>{title}</h1>" in page and "Validation loss per grid column" in page


def test_bad_input_is_one_error(run_folder: tuple[Path, Path], tmp_path: Path) -> None:
    train, _ = run_folder
    with pytest.raises(FluxpipeError, match="method 'dreambooth' is not one of lora, full, controlnet"):
        run_report.run(_config(train, None, tmp_path / "r", method="dreambooth"))
    (train / "run.safetensors").unlink()
    with pytest.raises(FluxpipeError, match=r"run.safetensors: the run's final file is missing; train first"):
        run_report.run(_config(train, None, tmp_path / "r"))
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_saved_files_are_in_training_order(run_folder: tuple[Path, Path]) -> None:
    train, _ = run_folder
    write_st(train / "run-step00000004.safetensors", {"w": torch.ones(1)}, {"ss_steps": "4", "ss_epoch": "2"})
    write_st(train / "run-other.safetensors", {"w": torch.ones(1)})  # not one of the run's saves
    assert [(f.label, f.step) for f in saved_files(train, "run")] == [
        ("epoch 1", 3),
        ("step 4", 4),
        ("epoch 2", 6),
        ("final", 6),
    ]


def test_run_report_command_after_a_real_lora_run(
    demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fluxpipe train lora` on the demo, then `fluxpipe run-report lora` with the same flags: the settings are the
    run's (rank, optimizer, resolved defaults), the steps and epochs the trainer's."""
    from test_train_lora import seed_command

    monkeypatch.chdir(REPO)
    flags = seed_command(demo_dir, tmp_path / "train", "--max_train_epochs", "1", "--network_train_unet_only")
    assert main(["train", "lora", *flags]) == 0
    out = tmp_path / "report"
    assert main(["run-report", "lora", "--out", str(out), *flags]) == 0
    page = (out / "run.html").read_text()
    assert _cells(page, "rank (network_dim)") == ["16"] and _cells(page, "alpha (network_alpha)") == ["1.0"]
    assert _cells(page, "optimizer") == ["AdamW8bit"] and _cells(page, "seed") == ["42"]  # the real default
    assert _cells(page, "memory mode") == ["gradient checkpointing, blocks_to_swap 18"]
    assert _cells(page, "resolution") == ["256×256"] and _cells(page, "text encoder trained") == ["no"]
    assert _cells(page, "steps run") == ["5"]  # 5 images x 2 repeats / batch 2, one epoch
    assert hashlib.sha256((demo_dir / "flux1-dev.safetensors").read_bytes()).hexdigest() in page
