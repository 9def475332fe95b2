"""What a training run leaves in its output folder, read back for the run report (no torch needed).

``<name>-loss.jsonl``: one record per optimizer step (``step``, ``epoch`` counted from 0, ``loss``, ``lr``,
``elapsed_s`` since the job started, ``peak_memory_mb``); ``<name>-validation.jsonl``: the validation loss
(``step``, ``epoch``, ``loss``, ``by_sigma``); the saved files ``<name>-000005.safetensors`` (per epoch),
``<name>-step00000100.safetensors`` (per step) and ``<name>.safetensors`` (final) with their metadata.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from fluxpipe.errors import FluxpipeError


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file ([] when it is absent); a broken line is a FluxpipeError naming it."""
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise FluxpipeError(f"{path}:{n}: not a JSON record ({e})") from e
    return out


def file_metadata(path: Path) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` ({} when there is none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            return dict(f.metadata() or {})
    except (OSError, ValueError) as e:  # safetensors raises SafetensorError (a ValueError) on a bad header
        raise FluxpipeError(f"{path}: not a readable safetensors file ({e})") from e


@dataclass(frozen=True, slots=True)
class SavedFile:
    label: str  # "epoch 5", "step 100", "final"
    path: Path
    step: int
    epoch: int | None


def saved_files(train_dir: Path, name: str) -> list[SavedFile]:
    """The run's saved models in training order (by step), the final file last (the grid's columns)."""
    pattern = re.compile(rf"^{re.escape(name)}(?:-(\d{{6}})|-step(\d{{8}}))?\.safetensors$")
    found = []
    for path in sorted(train_dir.glob(f"{name}*.safetensors")):
        m = pattern.match(path.name)
        if not m:
            continue
        meta = file_metadata(path)
        step, epoch = int(meta.get("ss_steps", 0)), int(meta.get("ss_epoch", 0)) or None
        label = f"epoch {int(m.group(1))}" if m.group(1) else f"step {int(m.group(2))}" if m.group(2) else "final"
        found.append(SavedFile(label, path, step, epoch))
    found.sort(key=lambda c: (c.label == "final", c.step))
    return found


@dataclass(frozen=True, slots=True)
class EpochTiming:
    epoch: int  # counted from 1
    steps: int
    wall_s: float
    s_per_step: float
    peak_memory_mb: float | None
    mean_loss: float


def _durations(records: list[dict]) -> list[float]:
    """Seconds each step took. ``elapsed_s`` counts from the start of its job: where it falls (a resumed job),
    that step's own value is its duration."""
    out, before = [], 0.0
    for r in records:
        now = float(r.get("elapsed_s", 0.0))
        out.append(now - before if now >= before else now)
        before = now
    return out


def epoch_timings(records: list[dict]) -> list[EpochTiming]:
    """Per epoch of the loss log: its steps, wall time, seconds per step, peak memory and mean loss."""
    by_epoch: dict[int, list[tuple[dict, float]]] = {}
    for r, d in zip(records, _durations(records), strict=True):
        by_epoch.setdefault(int(r.get("epoch", 0)), []).append((r, d))
    out = []
    for epoch in sorted(by_epoch):
        rows = by_epoch[epoch]
        wall = sum(d for _, d in rows)
        peaks = [float(r["peak_memory_mb"]) for r, _ in rows if r.get("peak_memory_mb") is not None]
        out.append(
            EpochTiming(
                epoch=epoch + 1,
                steps=len(rows),
                wall_s=wall,
                s_per_step=wall / len(rows),
                peak_memory_mb=max(peaks) if peaks else None,
                mean_loss=sum(float(r["loss"]) for r, _ in rows) / len(rows),
            )
        )
    return out
