"""Run report stage (rules ``run_report_lora`` / ``_full`` / ``_controlnet``): what a trainer wants to read about
one training run, for ``snakemake --report``. Output in ``out``:

* ``run.html``: one self-contained page: the run's settings (from its flags, defaults resolved), the model
  files with their sha256 (the validate report's, else hashed here), the steps run, wall time, seconds per
  step and peak memory per epoch, the curves, validation loss per grid column (the saved files; for a LoRA
  the evaluate stage's metrics, with the sample distance), the training-loss metrics and the dataset (split,
  buckets, repeats, preview, the held-out images);
* ``curves.png``: training loss, learning rate per step; seconds per step and peak memory per epoch;
* ``dataset.png``: thumbnails with captions, split, repeats and bucket (held-out images framed in red).

Reads only: the training folder (``<name>-loss.jsonl``, ``<name>-validation.jsonl``, the saved files'
metadata), the manifest, the validate report and evaluate's ``metrics.json``. Writes are atomic.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from fluxpipe.errors import FluxpipeError
from fluxpipe.inference.run_figures import PreviewItem, curves_png, preview_png, write_png
from fluxpipe.io import html_page as h
from fluxpipe.io.atomic import write_text_atomic
from fluxpipe.io.run_files import EpochTiming, epoch_timings, file_metadata, read_jsonl, saved_files

log = logging.getLogger(__name__)

METHODS = {"lora": "LoRA", "full": "Full fine-tune", "controlnet": "ControlNet"}


@dataclass(frozen=True, kw_only=True, slots=True)
class RunReportConfig:
    method: str  # lora | full | controlnet
    train_dir: Path
    output_name: str
    out: Path
    settings: tuple[tuple[str, str], ...]  # (name, value) in display order: the run's flags, defaults resolved
    model_files: tuple[tuple[str, Path], ...]  # (slot, file) the run trained from
    manifest: Path | None = None  # the dataset manifest (Parquet)
    validate_report: Path | None = None  # validate's models.json: its sha256 of each model file
    metrics: Path | None = None  # evaluate's metrics.json (the LoRA's sample grid)
    hash_cache: Path | None = None  # sha256 cache for files the validate report does not list
    preview_limit: int = 24  # thumbnails in dataset.png


def _json(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FluxpipeError(f"{path}: not valid JSON ({e})") from e
    return data if isinstance(data, dict) else None


def model_rows(cfg: RunReportConfig, final: Path | None) -> list[list[object]]:
    """[slot, file, bytes, sha256] of each model file, the run's final file last."""
    from fluxpipe.io.hashing import cached_sha256

    known: dict[str, str] = {}
    for facts in ((_json(cfg.validate_report) or {}).get("models") or {}).values():
        if isinstance(facts, dict) and facts.get("path") and facts.get("sha256"):
            known[str(Path(facts["path"]).resolve())] = facts["sha256"]
    files = [*cfg.model_files, *([("trained: " + METHODS[cfg.method], final)] if final else [])]
    rows: list[list[object]] = []
    for slot, path in files:
        if not path.is_file():
            rows.append([slot, str(path), None, "missing"])
            continue
        digest = known.get(str(path.resolve())) or cached_sha256(path, cfg.hash_cache)[0]
        rows.append([slot, str(path), path.stat().st_size, digest])
    return rows


def run_rows(records: list[dict], epochs: list[EpochTiming], meta: dict[str, str]) -> list[tuple[str, object]]:
    """What the run did: steps, epochs, wall time, mean seconds per step, peak memory."""
    wall = sum(e.wall_s for e in epochs)
    peaks = [e.peak_memory_mb for e in epochs if e.peak_memory_mb is not None]
    steps = int(meta["ss_steps"]) if meta.get("ss_steps") else (int(records[-1]["step"]) if records else 0)
    return [
        ("steps run", steps),
        ("epochs run", int(meta["ss_epoch"]) if meta.get("ss_epoch") else len(epochs)),
        ("wall time (training steps)", f"{wall:.1f} s ({wall / 60:.1f} min)"),
        ("mean s/step", round(wall / len(records), 4) if records else None),
        ("peak memory", f"{max(peaks):.0f} MiB" if peaks else "not recorded"),
        ("settings digest", meta.get("fluxpipe_settings")),
        ("written by", meta.get("modelspec.implementation_version")),
    ]


def grid_columns(cfg: RunReportConfig, validation: list[dict]) -> tuple[list[str], list[list[object]]]:
    """Validation loss per grid column: evaluate's metrics (a LoRA: base, saves, final), else the saved files
    matched to the validation records by step (step 0: before training)."""
    metrics = _json(cfg.metrics)
    if metrics and metrics.get("checkpoints"):
        head = ["grid column", "step", "epoch", "validation loss", "sample distance to training images"]
        return head, [
            [c.get("label"), c.get("step"), c.get("epoch"), c.get("validation_loss"), c.get("train_distance")]
            for c in metrics["checkpoints"]
        ]
    by_step = {int(r["step"]): r for r in validation}
    rows: list[list[object]] = []
    if 0 in by_step:
        rows.append(["before training", 0, 0, by_step[0].get("loss")])
    for f in saved_files(cfg.train_dir, cfg.output_name):
        rows.append([f.label, f.step, f.epoch, by_step.get(f.step, {}).get("loss")])
    return ["saved file", "step", "epoch", "validation loss"], rows


def loss_metrics(records: list[dict], validation: list[dict]) -> list[tuple[str, object]]:
    losses = [float(r["loss"]) for r in records]
    last = losses[-max(1, len(losses) // 10) :]
    rows: list[tuple[str, object]] = [
        ("training loss, first step", losses[0] if losses else None),
        ("training loss, mean of the last 10 % of steps", sum(last) / len(last) if losses else None),
        ("training loss, lowest", min(losses) if losses else None),
    ]
    if validation:
        best = min(validation, key=lambda r: float(r["loss"]))
        rows += [
            ("validation loss, first", float(validation[0]["loss"])),
            ("validation loss, last", float(validation[-1]["loss"])),
            ("validation loss, lowest (at step)", f"{float(best['loss']):.4g} (step {best['step']})"),
        ]
        rows += [(f"validation loss at sigma {s}, last", float(v)) for s, v in validation[-1]["by_sigma"].items()]
    return rows


def dataset_section(cfg: RunReportConfig) -> tuple[str, bytes | None]:
    """The dataset's split, buckets and repeats (tables), its held-out images and the preview PNG."""
    if cfg.manifest is None or not cfg.manifest.is_file():
        return h.section("Dataset", h.note("no dataset manifest given")), None
    import pandas as pd

    t = pd.read_parquet(cfg.manifest)
    train, held = t[t.split == "train"], t[t.split != "train"]
    summary = [
        ("training images", len(train)),
        ("training images × repeats (one epoch)", int(train.repeats.sum())),
        ("held-out images (validation split)", len(held)),
    ]
    buckets = (
        train.assign(weighted=train.repeats)
        .groupby(["bucket_w", "bucket_h"])
        .agg(images=("path", "size"), weighted=("weighted", "sum"))
        .reset_index()
    )
    bucket_rows = [[f"{r.bucket_w}×{r.bucket_h}", int(r.images), int(r.weighted)] for r in buckets.itertuples()]
    subsets = t.groupby(["dataset", "subset", "split"]).agg(images=("path", "size"), repeats=("repeats", "max"))
    subset_rows = [[f"{d}/{s}", split, int(r.images), int(r.repeats)] for (d, s, split), r in subsets.iterrows()]
    shown = pd.concat([train, held]).head(cfg.preview_limit)
    items = [
        PreviewItem(Path(r.path), str(r.caption), str(r.split), int(r.repeats), (int(r.bucket_w), int(r.bucket_h)))
        for r in shown.itertuples()
    ]
    more = len(t) - len(items)
    png = preview_png(items, f"{len(items)} of {len(t)} images" + (f" ({more} more not shown)" if more else ""))
    parts = [
        h.key_values(summary),
        h.table(["bucket (W×H)", "training images", "× repeats"], bucket_rows),
        h.table(["dataset/subset", "split", "images", "repeats"], subset_rows),
        h.image(png, "dataset preview"),
        h.section("Held-out images", h.table(["image", "caption"], [[r.path, r.caption] for r in held.itertuples()]))
        if len(held)
        else h.note("no held-out images: set validation_split in the dataset TOML for a validation loss"),
    ]
    return h.section("Dataset", *parts), png


def epoch_rows(epochs: list[EpochTiming]) -> list[list[object]]:
    return [
        [e.epoch, e.steps, round(e.wall_s, 2), round(e.s_per_step, 4), e.peak_memory_mb, e.mean_loss] for e in epochs
    ]


def run(cfg: RunReportConfig) -> dict:
    """Write run.html, curves.png and dataset.png; returns {"settings": ..., "run": ..., "files": [...]}."""
    if cfg.method not in METHODS:
        raise FluxpipeError(f"run report: method {cfg.method!r} is not one of {', '.join(METHODS)}")
    final = cfg.train_dir / f"{cfg.output_name}.safetensors"
    if not final.is_file():
        raise FluxpipeError(f"{final}: the run's final file is missing; train first")
    meta = file_metadata(final)
    records = read_jsonl(cfg.train_dir / f"{cfg.output_name}-loss.jsonl")
    validation = read_jsonl(cfg.train_dir / f"{cfg.output_name}-validation.jsonl")
    epochs = epoch_timings(records)
    title = f"{METHODS[cfg.method]} run: {cfg.output_name}"
    curves = curves_png(title, records, epochs)
    dataset_html, preview = dataset_section(cfg)
    head, columns = grid_columns(cfg, validation)
    facts = run_rows(records, epochs, meta)
    sections = [
        h.section("Settings", h.key_values([("method", METHODS[cfg.method]), *cfg.settings])),
        h.section("Model files", h.table(["file", "path", "bytes", "sha256"], model_rows(cfg, final))),
        h.section("Run", h.key_values(facts)),
        h.section(
            "Per epoch",
            h.table(
                ["epoch", "steps", "wall time (s)", "s/step", "peak memory (MiB)", "mean loss"], epoch_rows(epochs)
            ),
        ),
        h.section("Curves", h.image(curves, "training curves")),
        h.section("Validation loss per grid column", h.table(head, columns) if columns else h.note("no saved files")),
        h.section("Metrics", h.key_values(loss_metrics(records, validation))),
        dataset_html,
    ]
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_png(curves, cfg.out / "curves.png")
    write_png(preview or _no_dataset_png(), cfg.out / "dataset.png")
    write_text_atomic(cfg.out / "run.html", h.page(title, f"training folder {cfg.train_dir}", sections))
    log.info("run report of %s written to %s", cfg.output_name, cfg.out)
    return {"settings": dict(cfg.settings), "run": dict(facts), "files": ["run.html", "curves.png", "dataset.png"]}


def _no_dataset_png() -> bytes:
    return preview_png([], "no dataset manifest given")
