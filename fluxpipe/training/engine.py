"""The one training loop of every method (LoRA, full fine-tune, ControlNet).

``train_loop`` walks the epochs' global batches (data parallel: each rank computes its rows of every batch),
accumulates micro-batch gradients, scales the loss under fp16 on a GPU (``torch.amp.GradScaler``), clips and
steps the optimizers and schedulers, logs the loss, runs samples and the validation loss, saves per epoch / per
step (pruning old saves), ends a segment with its state, and resumes exactly from a state folder. A method
contributes only what differs, as a ``Method``: what is trained, the loss of a batch (its forward), the optimizers,
how its file is saved and its state captured and restored. Nothing here knows which method it runs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from fluxpipe.io.progress import progress
from fluxpipe.data.batches import CachedTensors, TrainItem, epoch_batches, epoch_captions, load_items, make_batch
from fluxpipe.errors import FluxpipeError
from fluxpipe.io.atomic import remove_stale_temps
from fluxpipe.parallel.distributed import World
from fluxpipe.training.ema import Ema, ema_metadata, save_beside
from fluxpipe.training.live_latents import LatentEncoder
from fluxpipe.training.live_text import TextEncoders, step_captions
from fluxpipe.training.log import TrainLogger
from fluxpipe.training.monitor import Monitor, MonitorSettings
from fluxpipe.training.saving import (
    check_segment,
    epoch_save_interval,
    log_step,
    plan_steps,
    prune_old,
    resume_from,
    segment_suffix,
    usage,
    write_losses,
    write_state,
)
from fluxpipe.training.settings import LoopSettings
from fluxpipe.training.state import TrainState, restore_rng
from fluxpipe.training.weights import Optimizers

log = logging.getLogger(__name__)

StateParts = tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]  # weights, optimizer, scheduler
# (batch, noise generator, this rank's rows or None, the batch's item indices) -> this rank's mean loss
LossFn = Callable[[dict, torch.Generator, list[int] | None, list[int]], Tensor]
# (suffix, step, epoch, extra metadata) -> the file written
SaveFn = Callable[[str, int, int, dict[str, str] | None], Path]


def _nothing() -> None:
    return None


def _no_sync_needed(boundary: bool) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@dataclass(frozen=True, kw_only=True)
class Method:
    """What one training method contributes to ``train_loop``."""

    optim: Optimizers  # the optimizers and schedulers of what is trained
    loss: LossFn  # the forward: a batch's loss (with its autocast and data-parallel wrapper)
    save: SaveFn  # the output file (called on every rank when ``sharded``, else on rank 0)
    capture: Callable[[], StateParts]  # a state folder's parts
    restore: Callable[[TrainState], None]  # ... put back
    monitor: Callable[[TrainLogger, bool], Monitor]  # samples and validation loss (logger, writes files)
    batch_dtype: torch.dtype  # the dtype the cached tensors are fed in
    sync: Callable[[bool], contextlib.AbstractContextManager] = _no_sync_needed  # gradient sync this micro-batch?
    after_step: Callable[[], None] = _nothing  # after each optimizer step (e.g. drop block-swap copies)
    ema: Ema | None = None
    sharded: bool = False  # FSDP: every rank takes part in saving, states and the monitor
    close: Callable[[], None] = _nothing


@dataclass(frozen=True)
class TrainData:
    """The training split, its cached tensors and the step plan (global batches: per-process x world size)."""

    items: list[TrainItem]
    tensors: CachedTensors
    sizes: dict[int, int]
    batches: int  # global batches per epoch
    total: int  # optimizer steps of the run
    epochs: int
    w: World
    encoders: TextEncoders | None = None  # uncached text: the captions are encoded each step
    latents: LatentEncoder | None = None  # uncached latents (per-step image augmentation): the AE each step


def load_data(s: LoopSettings, w: World) -> TrainData:
    items = load_items(s.manifest, s.latent_index, s.text_index, split="train", references=s.references)
    if not items:
        raise FluxpipeError(f"{s.manifest}: no training images (all in the validation split?)")
    sizes = {k: v * w.size for k, v in s.batch_sizes.items()}
    batches = len(epoch_batches(items, sizes, 0, s.seed))
    total, epochs = plan_steps(batches, s)
    encoders = TextEncoders(s.live_text, s.device) if s.live_text is not None else None
    if s.live_latents is not None:
        s.live_latents.check(items)
    latents = LatentEncoder(s.live_latents, s.device) if s.live_latents is not None else None
    if encoders is not None:
        log.info("uncached text: the text encoders encode each step's captions")
    if latents is not None:
        log.info("uncached latents: the AE encodes the random_crop / color_aug subsets' images each step")
    tensors = CachedTensors(s.latent_index, s.text_index)
    return TrainData(items, tensors, sizes, batches, total, epochs, w, encoders, latents)


def step_batch(
    s: LoopSettings,
    d: TrainData,
    items: list[TrainItem],
    indices: list[int],
    at: tuple[int, int],
    gen: torch.Generator,
    dtype: torch.dtype,
) -> dict:
    """The batch of ``indices`` at (epoch, optimizer step) ``at``: cached tensors; with uncached latents the
    augmented subsets' images encoded now, with uncached text this step's augmented captions
    (``fluxpipe.training.live_latents`` / ``live_text``)."""
    enc = d.latents
    fresh = (lambda it, flip: enc.moments(it, flip, *at)) if enc is not None else None  # noqa: E731
    batch = make_batch(items, indices, d.tensors, gen, s.device, dtype, s.prior_loss_weight, fresh)
    chosen = [items[i] for i in indices]
    if d.encoders is None or s.live_text is None:
        batch["captions"] = [it.caption for it in chosen]
        return batch
    captions = step_captions(s.live_text, chosen, at[0], at[1], d.total)
    return {**batch, **d.encoders(captions, s.device, dtype), "captions": captions}


def scales_loss(compute_dtype: torch.dtype, device: str) -> bool:
    """fp16 on a GPU scales the loss so that small gradients survive (the CPU computes fp16 runs in bf16)."""
    return compute_dtype == torch.float16 and device.startswith("cuda")


def grad_scaler(compute_dtype: torch.dtype, device: str) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cuda", enabled=scales_loss(compute_dtype, device))


def ddp_sync(model: nn.Module, w: World) -> Callable[[bool], contextlib.AbstractContextManager]:
    """DDP's gradient sync only on an optimizer step's last micro-batch."""
    no_sync: Callable[[], contextlib.AbstractContextManager] = getattr(model, "no_sync", contextlib.nullcontext)
    return lambda boundary: no_sync() if w.size > 1 and not boundary else contextlib.nullcontext()


@dataclass
class _Run:
    s: LoopSettings
    m: Method
    d: TrainData
    gen: torch.Generator
    scaler: torch.amp.GradScaler
    records: list[dict] = field(default_factory=list)
    keep_until: int = 0  # a resumed run keeps the loss records up to its state's step

    def save_point(
        self, suffix: str, counters: tuple[int, int, int], kind: str = "", every: int | None = None, **what: bool
    ) -> None:
        """A model file (and its EMA's), a state folder (--save_state, or ``state=True``), old saves pruned,
        the loss log written. Rank 0 writes; a sharded model's every rank takes part in the gathers."""
        s, m, w = self.s, self.m, self.d.w
        step, epoch, _ = counters
        if not (w.main or m.sharded):
            return
        if what.get("model", True):
            with m.optim.eval_weights():  # (schedule-free: its averaged weights, as the reference saves them)
                m.save(suffix, step, epoch, None)
                save_beside(m.ema, lambda x: m.save(x, step, epoch, ema_metadata(m.ema)), suffix)
        if what.get("state", s.save_state):
            parts = m.capture()
            if w.main:
                extra = {
                    "settings": s.settings,
                    "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                    "ema": m.ema.state_dict() if m.ema is not None else None,
                }
                write_state(s.output_dir / f"{s.output_name}{suffix}-state", counters, parts, self.gen, extra)
        if w.main:
            if kind:
                prune_old(s, kind, step if kind == "step" else epoch, every)
            write_losses(s.output_dir / f"{s.output_name}-loss.jsonl", self.records, self.keep_until)

    def resume(self) -> tuple[int, int, int]:
        """(step, epoch, batch in epoch) to start at: a state's, or zeros."""
        s, m, w = self.s, self.m, self.d.w
        large = w.main or w.size == 1 or not m.sharded  # sharded: rank 0 reads the tensors and broadcasts
        state = resume_from(s.output_dir, s.output_name, s.settings, s.resume, s.auto_resume, large=large)
        if state is None:
            return 0, 0, 0
        check_segment(s.stop_at_step, state.step)
        m.restore(state)
        if m.ema is not None:
            m.ema.load_state_dict(state.extra["ema"])
        restore_rng(state.rng, {"noise": self.gen})
        if self.scaler.is_enabled() and state.extra.get("grad_scaler"):
            self.scaler.load_state_dict(state.extra["grad_scaler"])
        self.keep_until = state.step
        return state.step, state.epoch, state.batch_in_epoch


def check_scaler(scaler: torch.amp.GradScaler, optim: Optimizers) -> None:
    if scaler.is_enabled() and optim.hooks is not None:
        raise FluxpipeError(
            "--mixed_precision fp16 with --fused_backward_pass / --blockwise_fused_optimizers: the fused "
            "modes step inside backward, where the fp16 loss scale cannot be undone; use --mixed_precision bf16"
        )


@contextlib.contextmanager
def _closing(m: Method, d: TrainData, bar: tqdm, logger: TrainLogger) -> Iterator[None]:
    try:
        yield
    finally:
        bar.close()
        logger.close()


def train_loop(s: LoopSettings, m: Method, d: TrainData) -> Path:
    """Train ``m`` on ``d``; returns the final file, or, when a segment stops early, its state folder."""
    w, accum = d.w, s.gradient_accumulation_steps
    scaler = grad_scaler(s.compute_dtype, s.device)
    check_scaler(scaler, m.optim)
    gen = torch.Generator().manual_seed(s.seed)
    run = _Run(s, m, d, gen, scaler)
    step, start_epoch, start_batch = run.resume()
    s.output_dir.mkdir(parents=True, exist_ok=True)
    if w.main:  # what a killed run of this output left
        remove_stale_temps(s.output_dir, s.output_name)
    every_epochs = epoch_save_interval(s.save_every_n_epochs, s.save_n_epoch_ratio, d.epochs)
    logger = TrainLogger(
        s.logging_dir if w.main else None,
        s.log_prefix,
        window=math.ceil(d.batches / accum),
        tracker_name=s.log_tracker_name,
    )
    if w.main or m.sharded:  # (sharded: each forward needs every rank)
        monitor = m.monitor(logger, w.main)
    else:
        monitor = Monitor(MonitorSettings(), output_dir=s.output_dir, output_name=s.output_name, seed=s.seed)
    if m.ema is not None and s.ema is not None and s.ema.for_eval:
        monitor.weights = m.ema.swapped
    monitor.at_start(step)
    bar = progress(  # (on the terminal under Snakemake too: fluxpipe.io.progress)
        total=d.total, initial=step, desc=f"train {s.output_name}", unit="step", mininterval=2, disable=not w.main
    )
    started = time.monotonic()
    epoch, bi = start_epoch, start_batch
    with _closing(m, d, bar, logger):
        for epoch in range(start_epoch, d.epochs):
            batches = epoch_batches(d.items, d.sizes, epoch, s.seed)
            items = epoch_captions(d.items, epoch)  # each item's cached caption variant of this epoch
            first = start_batch if epoch == start_epoch else 0
            for bi in range(first, len(batches)):
                boundary = not ((bi + 1 - first) % accum and bi + 1 < len(batches))  # else: accumulate
                batch = step_batch(s, d, items, batches[bi], (epoch, step), gen, m.batch_dtype)
                rows, share = w.part(len(batches[bi]))  # this rank's rows, and its loss's weight in the average
                with m.sync(boundary):
                    loss = m.loss(batch, gen, rows, batches[bi])
                    scaler.scale(loss * share / accum).backward()
                if not boundary:
                    continue
                loss_value = float(w.mean(loss.detach(), len(rows) if rows is not None else 1))  # once a step
                m.optim.step(scaler)
                m.after_step()
                step += 1
                if m.ema is not None:
                    m.ema.update(step)
                log_step(run.records, logger, bar, step, epoch, loss_value, m.optim.lrs(), usage(started, s.device))
                monitor.after_step(step, epoch)
                if s.save_every_n_steps and step % s.save_every_n_steps == 0 and step < d.total:
                    run.save_point(f"-step{step:08d}", (step, epoch, bi + 1), "step", s.save_every_n_steps)
                if step >= d.total or step == s.stop_at_step:
                    break
            if step == s.stop_at_step and step < d.total:  # this segment ends; the next job resumes its state
                run.save_point(segment_suffix(step), (step, epoch, bi + 1), model=False, state=True)
                _finish(m, d)
                return s.output_dir / f"{s.output_name}{segment_suffix(step)}-state"
            logger.epoch(epoch + 1)
            monitor.after_epoch(epoch + 1, step)
            if step >= d.total:
                break
            if every_epochs and (epoch + 1) % every_epochs == 0 and epoch + 1 < d.epochs:
                run.save_point(f"-{epoch + 1:06d}", (step, epoch + 1, 0), "epoch", every_epochs)
    run.save_point("", (step, d.epochs, 0), model=False)  # the final state (with --save_state) and the loss log
    final = s.output_dir / f"{s.output_name}.safetensors"
    if w.main or m.sharded:
        done = min(epoch + 1, d.epochs)
        with m.optim.eval_weights():  # the final files hold a schedule-free optimizer's averaged weights
            save_beside(m.ema, lambda x: m.save(x, step, done, ema_metadata(m.ema)), "")
            final = m.save("", step, done, None)
    _finish(m, d)
    return final


def _finish(m: Method, d: TrainData) -> None:
    m.optim.remove()
    m.close()
    d.tensors.close()
    d.w.barrier()  # the others wait for rank 0's files
