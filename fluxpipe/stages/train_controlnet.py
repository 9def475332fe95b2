"""ControlNet training stage (`fluxpipe train controlnet`, rule ``train_controlnet``).

Input: the frozen base DiT (``--blocks_to_swap`` and ``--fp8_base`` allowed for it), a ControlNet-Flux
(``fluxpipe.models.controlnet``: fresh, with its zero-initialised hint output and residual projections, or
``--controlnet_model_name_or_path``, loaded strictly), the caches, and each training image's conditioning image
from the manifest (resized and centre-cropped with its target, mirrored with it; ``fluxpipe.data.conditioning``).
The ControlNet's residuals are added to the base model's image stream after every double block; the loss is
the LoRA trainer's flow-matching loss (l2 or l1: the reference passes no Huber threshold here). Output: the
ControlNet's weights in the reference's key layout (``<name>.safetensors`` and per-epoch / per-step files),
``<name>-loss.jsonl``, ``-state`` folders that resume exactly.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from fluxpipe.data.batches import (
    CachedTensors,
    epoch_batches,
    epoch_captions,
    load_items,
    make_batch,
    refuse_preservation,
)
from fluxpipe.errors import FluxpipeError
from fluxpipe.io.atomic import remove_stale_temps
from fluxpipe.models.controlnet import ControlledFlux, ControlNetFlux, load_controlnet_state
from fluxpipe.parallel.distributed import world, wrap
from fluxpipe.stages.train_full import TrainFullConfig, check_parallel, restore, resume_state, write_state
from fluxpipe.stages.train_lora import (
    FlowSettings,
    check_segment,
    draw_flow_noise,
    epoch_save_interval,
    load_dit,
    log_step,
    plan_steps,
    prediction_loss,
    prune_old,
    segment_suffix,
    select_rows,
    write_losses,
)
from fluxpipe.training.ema import create as create_ema
from fluxpipe.training.ema import ema_metadata, save_beside
from fluxpipe.training.log import TrainLogger
from fluxpipe.training.state import restore_rng
from fluxpipe.training.weights import WeightOptimizers, modelspec, save_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainControlNetConfig(TrainFullConfig):
    """The full fine-tune's settings (they apply to the ControlNet's weights here; blocks_to_swap to the base)
    plus the frozen base model's options and the starting ControlNet."""

    controlnet: Path | None = None  # start from this ControlNet (strict), else fresh
    fp8_base: bool = False
    torch_compile: bool = False
    dynamo_backend: str = "inductor"


def build_controlnet(cfg: TrainControlNetConfig, params) -> ControlNetFlux:  # noqa: ANN001 - FluxParams
    torch.manual_seed(cfg.seed)  # a fresh ControlNet's initial weights follow the seed
    controlnet = ControlNetFlux(params)
    if cfg.controlnet is not None:
        from fluxpipe.io.safetensors_file import read_header, read_tensors

        header = read_header(cfg.controlnet)
        load_controlnet_state(controlnet, read_tensors(cfg.controlnet, {k: k for k in header.tensors}))
    controlnet.gradient_checkpointing = cfg.gradient_checkpointing
    dtype = torch.bfloat16 if cfg.full_bf16 else torch.float32
    return controlnet.to(cfg.device, dtype).requires_grad_(True).train()


def conditioning_rows(cfg: TrainControlNetConfig, items: list) -> list[dict]:
    """Manifest rows of the training items, each with its conditioning image (else one error)."""
    from fluxpipe.io.tables import read_parquet

    rows = read_parquet(cfg.manifest)[0].to_dict("records")
    missing = [str(rows[it.row]["path"]) for it in items if not rows[it.row].get("conditioning")]
    if missing:
        raise FluxpipeError(
            f"{cfg.manifest}: {len(missing)} training images have no conditioning image (e.g. "
            f"{missing[0]}); ControlNet training needs conditioning_data_dir in every subset of the "
            "dataset TOML"
        )
    return rows


def hints(rows: list[dict], items: list, batch: dict, images, device: str) -> Tensor:  # noqa: ANN001
    """[B, 3, H, W] control images of a batch, mirrored where the batch drew a flipped latent."""
    flipped = batch["flipped"].tolist()
    return torch.stack(
        [images.get(rows[items[i].row], flip=f) for i, f in zip(batch["indices"], flipped, strict=True)]
    ).to(device)


def save_controlnet(
    controlnet: ControlNetFlux,
    cfg: TrainControlNetConfig,
    suffix: str,
    step: int,
    epoch: int,
    extra: dict[str, str] | None = None,
) -> Path:
    meta = {
        **modelspec(f"flux-1-{cfg.variant}/controlnet", cfg.output_name),
        "ss_steps": str(step),
        "ss_epoch": str(epoch),
        "fluxpipe_settings": cfg.settings,
        **(extra or {}),
    }
    path = save_weights(controlnet, cfg.output_dir / f"{cfg.output_name}{suffix}.safetensors", meta, cfg.save_precision)
    log.info("saved %s (step %d, epoch %d)", path, step, epoch)
    return path


class ControlNetLoss(torch.nn.Module):
    """One rank's loss of a batch, as a module whose only parameters are the ControlNet's (what DDP wraps; the
    frozen base model is not registered)."""

    def __init__(self, controlnet: ControlNetFlux, dit: torch.nn.Module, m: FlowSettings) -> None:
        super().__init__()
        self.controlnet, self.dit, self.m = controlnet, [dit], m

    def forward(self, batch: dict, gen: torch.Generator, rows: list[int] | None) -> Tensor:
        draws = draw_flow_noise(batch, self.m, gen)  # every rank draws for the whole batch, in the same order
        if rows == []:  # a short batch left this rank nothing: a zero loss that still reaches every parameter
            return sum(p.sum() for p in self.controlnet.parameters()) * 0.0
        if rows is not None:
            batch, draws = select_rows(batch, draws, rows)
        model = ControlledFlux(self.dit[0], self.controlnet, batch["hint"])
        return prediction_loss(model, batch, self.m, *draws).mean()


def train(cfg: TrainControlNetConfig) -> Path:
    """The ControlNet training loop (DDP across torchrun's processes); returns the final ControlNet file, or,
    when a segment stops early, its state folder."""
    from fluxpipe.data.conditioning import ConditioningImages

    gen = torch.Generator().manual_seed(cfg.seed)
    items = load_items(cfg.manifest, cfg.latent_index, cfg.text_index, split="train")
    refuse_preservation(items, "ControlNet trainer")
    if not items:
        raise FluxpipeError(f"{cfg.manifest}: no training images (all in the validation split?)")
    w = world()  # data parallel: every rank walks the global batches (per-process batch x world size)
    check_parallel(cfg, w, sharded=False)
    rows_table, images = conditioning_rows(cfg, items), ConditioningImages()
    tensors = CachedTensors(cfg.latent_index, cfg.text_index)
    dit = load_dit(cfg).train()  # frozen, but in training mode: its blocks are checkpointed when asked
    controlnet = build_controlnet(cfg, dit.params)
    accum = cfg.gradient_accumulation_steps
    sizes = {k: v * w.size for k, v in cfg.batch_sizes.items()}
    first_batches = epoch_batches(items, sizes, 0, cfg.seed)
    total, epochs = plan_steps(len(first_batches), cfg)
    optim = WeightOptimizers(controlnet, cfg.optim, total)
    ema = create_ema(cfg.ema, controlnet)
    torch.manual_seed(cfg.seed)
    step, start_epoch, start_batch = 0, 0, 0
    state = resume_state(cfg)
    if state is not None:
        check_segment(cfg.stop_at_step, state.step)
        restore(controlnet, optim, state, w)
        if ema is not None:
            ema.load_state_dict(state.extra["ema"])
        restore_rng(state.rng, {"noise": gen})
        step, start_epoch, start_batch = state.step, state.epoch, state.batch_in_epoch
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    if w.main:  # what a killed run of this output left
        remove_stale_temps(cfg.output_dir, cfg.output_name)
    loss_file = cfg.output_dir / f"{cfg.output_name}-loss.jsonl"
    records: list[dict] = []
    every_epochs = epoch_save_interval(cfg.save_every_n_epochs, cfg.save_n_epoch_ratio, epochs)
    logger = TrainLogger(
        cfg.logging_dir if w.main else None,
        cfg.log_prefix,
        window=math.ceil(len(first_batches) / accum),
        tracker_name=cfg.log_tracker_name,
    )
    model = wrap(ControlNetLoss(controlnet, dit, cfg.math), w)

    def save_point(
        suffix: str,
        step: int,
        epoch: int,
        batch_in_epoch: int,
        kind: str = "",
        every: int | None = None,
        model_file: bool = True,
        state_too: bool = cfg.save_state,
    ) -> None:
        if not w.main:  # only rank 0 writes
            return
        if model_file:
            save_controlnet(controlnet, cfg, suffix, step, epoch)
            save_beside(ema, lambda s: save_controlnet(controlnet, cfg, s, step, epoch, ema_metadata(ema)), suffix)
        if state_too:
            write_state(controlnet, optim, gen, cfg, step, epoch, batch_in_epoch, suffix, ema=ema)
        if kind:
            prune_old(cfg, kind, step if kind == "step" else epoch, every)
        write_losses(loss_file, records, state.step if state else 0)

    bar = tqdm(
        total=total, initial=step, desc=f"train {cfg.output_name}", unit="step", mininterval=2, disable=not w.main
    )
    epoch = start_epoch
    for epoch in range(start_epoch, epochs):
        batches, epoch_items = epoch_batches(items, sizes, epoch, cfg.seed), epoch_captions(items, epoch)
        first = start_batch if epoch == start_epoch else 0
        for bi in range(first, len(batches)):
            boundary = not ((bi + 1 - first) % accum and bi + 1 < len(batches))  # else: accumulate
            batch = make_batch(epoch_items, batches[bi], tensors, gen, cfg.device, cfg.compute_dtype)
            batch["hint"] = hints(rows_table, items, batch, images, cfg.device)
            rows, share = w.part(len(batches[bi]))
            with model.no_sync() if w.size > 1 and not boundary else contextlib.nullcontext():
                with torch.autocast(
                    torch.device(cfg.device).type,
                    dtype=cfg.compute_dtype,
                    enabled=cfg.compute_dtype != torch.float32 and not cfg.full_bf16,
                ):
                    loss = model(batch, gen, rows)
                (loss * share / accum).backward()
            if not boundary:
                continue
            loss_value = float(w.mean(loss.detach(), len(rows) if rows is not None else 1))  # once a step
            optim.step()
            step += 1
            if ema is not None:
                ema.update(step)
            log_step(records, logger, bar, step, epoch, loss_value, optim.lrs())
            if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 and step < total:
                save_point(f"-step{step:08d}", step, epoch, bi + 1, "step", cfg.save_every_n_steps)
            if step >= total or step == cfg.stop_at_step:
                break
        if step == cfg.stop_at_step and step < total:  # this segment ends; the next job resumes its state
            save_point(segment_suffix(step), step, epoch, bi + 1, model_file=False, state_too=True)
            bar.close()
            logger.close()
            optim.remove()
            tensors.close()
            w.barrier()
            return cfg.output_dir / f"{cfg.output_name}{segment_suffix(step)}-state"
        logger.epoch(epoch + 1)
        if step >= total:
            break
        if every_epochs and (epoch + 1) % every_epochs == 0 and epoch + 1 < epochs:
            save_point(f"-{epoch + 1:06d}", step, epoch + 1, 0, "epoch", every_epochs)
    bar.close()
    logger.close()
    save_point("", step, epochs, 0, model_file=False)  # the final state (with --save_state) and the loss log
    if w.main:
        save_beside(
            ema, lambda s: save_controlnet(controlnet, cfg, s, step, min(epoch + 1, epochs), ema_metadata(ema)), ""
        )
    final = (
        save_controlnet(controlnet, cfg, "", step, min(epoch + 1, epochs))
        if w.main
        else cfg.output_dir / f"{cfg.output_name}.safetensors"
    )
    optim.remove()
    tensors.close()
    w.barrier()  # the others wait for rank 0's files
    return final
