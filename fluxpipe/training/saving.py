"""What every training method saves and logs, the same way: the step plan, the file names of per-epoch, per-step
and segment saves (and the pruning of old ones), the state folders a run resumes from, and the per-step loss log.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from fluxpipe.errors import FluxpipeError
from fluxpipe.io.atomic import write_text_atomic
from fluxpipe.training.log import TrainLogger
from fluxpipe.training.state import TrainState, capture_rng, load_state, newest_state, save_state

log = logging.getLogger(__name__)


class StepPlan(Protocol):
    @property
    def max_train_steps(self) -> int: ...
    @property
    def max_train_epochs(self) -> int | None: ...
    @property
    def gradient_accumulation_steps(self) -> int: ...


class Pruning(Protocol):
    @property
    def output_dir(self) -> Path: ...
    @property
    def output_name(self) -> str: ...
    @property
    def save_last_n_epochs(self) -> int | None: ...
    @property
    def save_last_n_epochs_state(self) -> int | None: ...
    @property
    def save_last_n_steps(self) -> int | None: ...
    @property
    def save_last_n_steps_state(self) -> int | None: ...


def segment_suffix(step: int) -> str:
    """The state folder a segment that stops at ``step`` leaves: ``<name>-seg00000100-state``."""
    return f"-seg{step:08d}"


def check_segment(stop_at_step: int | None, step: int) -> None:
    if stop_at_step is not None and stop_at_step <= step:
        raise FluxpipeError(
            f"--stop_at_step {stop_at_step}: the resumed run is already at step {step}; give a "
            "later step, or resume from an earlier state"
        )


def epoch_save_interval(save_every_n_epochs: int | None, save_n_epoch_ratio: int | None, epochs: int) -> int | None:
    """Epochs between per-epoch saves: --save_n_epoch_ratio n (at least n saves) overrides --save_every_n_epochs
    with max(1, epochs // n), as the reference."""
    if save_n_epoch_ratio:
        return max(1, epochs // save_n_epoch_ratio)
    return save_every_n_epochs


def plan_steps(num_batches: int, cfg: StepPlan) -> tuple[int, int]:
    """(total optimizer steps, epochs): --max_train_epochs overrides --max_train_steps, as the reference."""
    per_epoch = math.ceil(num_batches / cfg.gradient_accumulation_steps)
    if cfg.max_train_epochs:
        return cfg.max_train_epochs * per_epoch, cfg.max_train_epochs
    return cfg.max_train_steps, math.ceil(cfg.max_train_steps / per_epoch)


def prune_old(cfg: Pruning, kind: str, current: int, every: int | None) -> None:
    """--save_last_n_epochs / --save_last_n_steps (and their _state forms): remove the file (and state) saved
    n saves ago, as the reference does."""
    keep, keep_state = (
        (cfg.save_last_n_epochs, cfg.save_last_n_epochs_state)
        if kind == "epoch"
        else (cfg.save_last_n_steps, cfg.save_last_n_steps_state)
    )
    keep_state = keep_state or keep
    for n, is_state in ((keep, False), (keep_state, True)):
        if not n or not every:
            continue
        old = current - every * n
        if old <= 0:
            continue
        suffix = f"-{old:06d}" if kind == "epoch" else f"-step{old:08d}"
        target = cfg.output_dir / f"{cfg.output_name}{suffix}{'-state' if is_state else '.safetensors'}"
        if is_state and target.is_dir():
            shutil.rmtree(target)
        elif not is_state:
            target.unlink(missing_ok=True)
            target.with_name(f"{target.stem}-ema.safetensors").unlink(missing_ok=True)  # (--ema_decay's file)


def resume_from(
    output_dir: Path, output_name: str, settings: str | None, resume: Path | None, auto: bool, large: bool = True
) -> TrainState | None:
    """--resume DIR (must match the settings), or with auto_resume the newest state made with these settings
    and this data (states of other settings are left alone: a changed run starts afresh). ``large`` False: only
    the counters and small parts are read (a sharded run's other ranks get the tensors from rank 0)."""
    folder = resume or (newest_state(output_dir, output_name, settings) if auto else None)
    if folder is None:
        return None
    state = load_state(folder, large=large)
    if state.extra.get("settings") != settings:
        raise FluxpipeError(
            f"{folder}: this state was made with other training settings; resume it with the same "
            "settings, or delete the state folder (or pick another --output_name) to start afresh"
        )
    log.info("resuming from %s at step %d (epoch %d, batch %d)", folder, state.step, state.epoch, state.batch_in_epoch)
    return state


def write_state(
    folder: Path,
    counters: tuple[int, int, int],
    parts: tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]],
    gen: torch.Generator,
    extra: dict[str, Any],
) -> None:
    """A ``-state`` folder: the counters (step, epoch, batch in epoch), the trained weights, the optimizer and
    scheduler states, the noise generator's state and ``extra`` (settings digest, loss scaler, EMA)."""
    step, epoch, batch_in_epoch = counters
    weights, optimizer, scheduler = parts
    save_state(
        TrainState(
            step=step,
            epoch=epoch,
            batch_in_epoch=batch_in_epoch,
            weights=weights,
            optimizer=optimizer,
            scheduler=scheduler,
            rng=capture_rng({"noise": gen}),
            extra=extra,
        ),
        folder,
    )


def peak_memory_mb(device: str) -> float:
    """The run's peak memory so far: torch's allocated peak on CUDA, else the process's peak resident size."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def log_step(
    records: list[dict],
    logger: TrainLogger,
    bar: tqdm,
    step: int,
    epoch: int,
    loss: float,
    lrs: dict[str, float],
    usage: dict[str, float] | None = None,
) -> None:
    """One optimizer step's loss record (with ``usage``: elapsed_s and peak_memory_mb), logged scalars (``lrs``:
    by group, the first one recorded) and bar. A NaN/Inf loss stops the run here, before anything of this step
    is recorded or saved."""
    if not math.isfinite(loss):
        bar.close()  # the error line then starts a line of its own
        raise FluxpipeError(
            f"step {step}: the loss is {loss}; training stopped before saving anything of this step "
            "(the files and state saved before it are kept): lower the learning rate or check the "
            "data and model files, then resume from the last state"
        )
    records.append({"step": step, "epoch": epoch, "loss": loss, "lr": next(iter(lrs.values())), **(usage or {})})
    average = logger.step(step, loss, lrs)
    bar.set_postfix(loss=f"{loss:.4f}", avr_loss=f"{average:.4f}", epoch=epoch)
    bar.update(1)


def usage(started: float, device: str) -> dict[str, float]:
    """The resource figures of a loss record: wall seconds since ``started`` (time.monotonic) and peak memory."""
    return {"elapsed_s": round(time.monotonic() - started, 3), "peak_memory_mb": round(peak_memory_mb(device), 1)}


def write_losses(path: Path, records: list[dict], keep_until: int) -> None:
    """``<name>-loss.jsonl``: the records of this job after those of the resumed run up to ``keep_until``."""
    write_text_atomic(
        path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in _log_losses(path, records, keep_until))
    )


def _log_losses(path: Path, records: list[dict], keep_until: int) -> list[dict]:
    """Loss records up to ``keep_until`` steps (a resumed run drops the ones it will redo)."""
    if not path.is_file():
        return records
    old = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in old if r["step"] <= keep_until] + records
