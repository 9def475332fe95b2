"""Evaluate stage (rule ``evaluate_samples``): what each saved LoRA of a run does, side by side.

Input: the training folder (``<name>-000005.safetensors`` per-epoch files, ``<name>-step00000100.safetensors``
per-step files, the final ``<name>.safetensors``, ``<name>-loss.jsonl`` and, with a validation split,
``<name>-validation.jsonl``), the model files and fixed prompts x seeds. Output in ``out``:

* ``checkpoints/<label>.png``: one grid per checkpoint (rows: prompts, columns: seeds), ``base`` included;
* ``grid.png``: every prompt x seed (rows) across base and all checkpoints in training order (columns);
* ``loss.png``: the training loss per step (raw and smoothed); ``validation_loss.png``: the validation loss per
  step at each fixed sigma and their mean (a note when the dataset has no validation split);
* ``train_distance.png``: per checkpoint the mean distance of its samples to the nearest training image
  (``fluxpipe.inference.sample_distance``; needs the dataset manifest);
* ``metrics.json``: per checkpoint its step, epoch, file, validation loss and that distance; the loss summaries.

The DiT and the AE are loaded once; each LoRA is attached unmerged at ``lora_multiplier`` and detached again, so
every column starts from the same base weights. All writes are atomic.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fluxpipe.data.prompts import SamplePrompt
from fluxpipe.errors import FluxpipeError
from fluxpipe.io.run_files import read_jsonl, saved_files
from fluxpipe.inference.sample_distance import THUMB, mean_nearest_distance, training_thumbnails
from fluxpipe.inference.sampler import ModelFiles, Sampler, encode_texts, load_lora, load_sampler, lora_line, split_lora
from fluxpipe.io.atomic import write_text_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class EvaluateConfig:
    models: ModelFiles
    train_dir: Path
    output_name: str
    prompts: tuple[SamplePrompt, ...]
    seeds: tuple[int, ...]
    out: Path
    lora_multiplier: float = 1.0
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    t5_max_length: int = 512
    apply_t5_attn_mask: bool = False
    blocks_to_swap: int = 0
    reference_size: str = "kontext"  # Kontext prompts' reference resize: kontext (official) or target (sample size)
    model_type: str = "flux"  # chroma: models.flux is a Chroma DiT (T5 mask, guidance 0, the shifted schedule)
    controlnet: Path | None = None  # for prompts with a control image (--cn)
    manifest: Path | None = None  # the dataset manifest: its training images for the sample distance


@dataclass(frozen=True, slots=True)
class Checkpoint:
    label: str  # "base", "epoch 5", "step 100", "final"
    path: Path | None  # None: the base model
    step: int
    epoch: int | None


def find_checkpoints(train_dir: Path, name: str) -> list[Checkpoint]:
    """Base, then the run's saved LoRAs in training order (by step), the final file last."""
    found = [Checkpoint(f.label, f.path, f.step, f.epoch) for f in saved_files(train_dir, name)]
    if not any(c.label == "final" for c in found):
        raise FluxpipeError(
            f"{train_dir / (name + '.safetensors')}: the run's final LoRA is missing; train first "
            "(snakemake --cores 1 train_lora)"
        )
    return [Checkpoint("base", None, 0, 0), *found]


def render(
    sampler: Sampler, prompts: tuple[SamplePrompt, ...], seeds: tuple[int, ...], conds: dict
) -> list[list[Image.Image]]:
    """Images [prompt][seed] (a prompt's own seed replaces the list)."""
    rows = []
    for p in prompts:
        neg = conds.get(p.negative_prompt) if p.cfg_scale != 1.0 else None
        rows.append([sampler.image(p, conds[p.prompt], neg, s) for s in ((p.seed,) if p.seed is not None else seeds)])
    return rows


def write_plots(
    cfg: EvaluateConfig, losses: list[dict], validation: list[dict], distances: Sequence[tuple[int, float]] = ()
) -> None:
    from fluxpipe.inference.report_images import labelled_grid, plot_curves, save_png

    if losses:
        plot_curves(
            {"training loss": [(r["step"], r["loss"]) for r in losses]},
            cfg.out / "loss.png",
            title=f"{cfg.output_name}: training loss",
            xlabel="step",
            ylabel="loss",
            smooth=max(2, len(losses) // 20),
        )
    else:
        save_png(
            labelled_grid([[Image.new("RGB", (400, 40), "white")]], ["loss"], ["no training loss recorded"]),
            cfg.out / "loss.png",
        )
    if validation:
        sigmas = list(validation[0]["by_sigma"])
        series = {"mean": [(r["step"], r["loss"]) for r in validation]}
        series.update({f"sigma {s}": [(r["step"], r["by_sigma"][s]) for r in validation] for s in sigmas})
        plot_curves(
            series,
            cfg.out / "validation_loss.png",
            title=f"{cfg.output_name}: validation loss (held-out images, fixed sigmas and noise)",
            xlabel="step",
            ylabel="loss",
        )
    else:
        note = Image.new("RGB", (400, 40), "white")
        save_png(
            labelled_grid([[note]], ["validation"], ["no validation split (set validation_split in the dataset TOML)"]),
            cfg.out / "validation_loss.png",
        )
    if distances:
        plot_curves(
            {"samples to nearest training image": list(distances)},
            cfg.out / "train_distance.png",
            title=f"{cfg.output_name}: sample distance to the training images (lower: closer)",
            xlabel="step (0: base)",
            ylabel=f"RMS of {THUMB}x{THUMB} thumbnails",
        )
    else:
        save_png(
            labelled_grid(
                [[Image.new("RGB", (400, 40), "white")]],
                ["distance"],
                ["no training images (no dataset manifest given)"],
            ),
            cfg.out / "train_distance.png",
        )


def metrics(
    checkpoints: list[Checkpoint],
    losses: list[dict],
    validation: list[dict],
    distances: list[float | None] | None = None,
) -> dict:
    by_step = {r["step"]: r for r in validation}
    distances = distances or [None] * len(checkpoints)
    last = losses[-max(1, len(losses) // 10) :] if losses else []
    return {
        "checkpoints": [
            {
                "label": c.label,
                "file": str(c.path) if c.path else None,
                "step": c.step,
                "epoch": c.epoch,
                "validation_loss": by_step.get(c.step, {}).get("loss"),
                "train_distance": d,
            }
            for c, d in zip(checkpoints, distances, strict=True)
        ],
        "training_loss": {
            "steps": len(losses),
            "first": losses[0]["loss"] if losses else None,
            "last_10pct_mean": sum(r["loss"] for r in last) / len(last) if last else None,
        },
        "validation_loss": validation,
    }


def run(cfg: EvaluateConfig) -> dict:
    """Render base + every checkpoint, write the grids, the curves and metrics.json; returns the metrics."""
    from fluxpipe.inference.report_images import labelled_grid, save_png

    checkpoints = find_checkpoints(cfg.train_dir, cfg.output_name)
    session = open_session(cfg)
    refs = training_thumbnails(cfg.manifest) if cfg.manifest is not None and cfg.manifest.is_file() else None
    columns, distances = [], []
    for c in checkpoints:
        images = render_checkpoint(cfg, session, c)
        columns.append([img for row in images for img in row])
        distances.append(None if refs is None else mean_nearest_distance(columns[-1], refs))
        log.info("evaluated %s", c.label)
    row_labels = [
        f"{p.prompt[:40]} / seed {s}" for p in cfg.prompts for s in ((p.seed,) if p.seed is not None else cfg.seeds)
    ]
    grid = labelled_grid(
        [list(r) for r in zip(*columns, strict=True)],
        row_labels,
        [c.label for c in checkpoints],
        title=f"{cfg.output_name}: samples across training",
    )
    save_png(grid, cfg.out / "grid.png")
    losses = read_jsonl(cfg.train_dir / f"{cfg.output_name}-loss.jsonl")
    validation = read_jsonl(cfg.train_dir / f"{cfg.output_name}-validation.jsonl")
    write_plots(
        cfg, losses, validation, [(c.step, d) for c, d in zip(checkpoints, distances, strict=True) if d is not None]
    )
    result = metrics(checkpoints, losses, validation, distances)
    write_text_atomic(cfg.out / "metrics.json", json.dumps(result, indent=1) + "\n")
    return result


@dataclass(frozen=True, slots=True)
class Session:
    """What every checkpoint is rendered with: the loaded sampler, the base conditioning and how to re-encode."""

    sampler: Sampler
    texts: list[str]
    base_conds: dict
    encode: dict[str, Any]


def open_session(cfg: EvaluateConfig) -> Session:
    """Encode the prompts (encoders freed after), then load the DiT and the AE once for all checkpoints."""
    texts = [p.prompt for p in cfg.prompts] + [p.negative_prompt for p in cfg.prompts if p.cfg_scale != 1.0]
    enc: dict[str, Any] = {
        "device": cfg.device,
        "dtype": cfg.dtype,
        "max_length": cfg.t5_max_length,
        "apply_t5_attn_mask": cfg.apply_t5_attn_mask,
    }
    base_conds = encode_texts(cfg.models, texts, **enc)
    sampler = load_sampler(
        cfg.models,
        device=cfg.device,
        dtype=cfg.dtype,
        blocks_to_swap=cfg.blocks_to_swap,
        apply_t5_attn_mask=cfg.apply_t5_attn_mask,
        controlnet=cfg.controlnet,
        reference_size=cfg.reference_size,
        model_type=cfg.model_type,
    )
    return Session(sampler, texts, base_conds, enc)


def render_checkpoint(cfg: EvaluateConfig, session: Session, c: Checkpoint) -> list[list[Image.Image]]:
    """One checkpoint's images [prompt][seed] (its LoRA attached unmerged, detached after); writes its grid."""
    from fluxpipe.inference.report_images import labelled_grid, save_png
    from fluxpipe.lora.files import apply_lora, detach_loras

    conds, dit = session.base_conds, session.sampler.dit
    if c.path is not None:
        layout, kohya = load_lora(c.path)
        parts, mult = split_lora(kohya), cfg.lora_multiplier
        if "lora_unet" in parts:
            apply_lora(dit, parts["lora_unet"], mult, merge=False)
        if "lora_te1" in parts or "lora_te3" in parts:  # a text-encoder LoRA changes the conditioning
            conds = encode_texts(cfg.models, session.texts, loras=[(parts, mult)], **session.encode)
        log.info("%s", lora_line(c.path, layout, kohya))
    try:
        images = render(session.sampler, cfg.prompts, cfg.seeds, conds)
    finally:
        detach_loras(dit)
    seeds = (
        [str(s) for s in cfg.seeds] if all(p.seed is None for p in cfg.prompts) else ["images"] * max(map(len, images))
    )
    padded = [r + [Image.new("RGB", r[0].size, "white")] * (len(seeds) - len(r)) for r in images]
    save_png(
        labelled_grid(
            padded,
            [p.prompt[:60] for p in cfg.prompts],
            [f"seed {s}" for s in seeds],
            title=f"{cfg.output_name}: {c.label}",
        ),
        cfg.out / "checkpoints" / f"{slug(c.label)}.png",
    )
    return images


def slug(label: str) -> str:
    """'epoch 5' -> 'epoch-000005'; 'step 100' -> 'step-00000100'; 'base' / 'final' unchanged (sortable names)."""
    kind, _, number = label.partition(" ")
    return f"{kind}-{int(number):06d}" if kind == "epoch" else f"{kind}-{int(number):08d}" if number else kind
