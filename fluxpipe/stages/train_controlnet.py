"""ControlNet training stage (`fluxpipe train controlnet`, rule ``train_controlnet``).

Input: the frozen base DiT (``--blocks_to_swap`` and ``--fp8_base`` allowed for it), a ControlNet-Flux
(``fluxpipe.models.controlnet``: fresh, with its zero-initialised hint output and residual projections, or
``--controlnet_model_name_or_path``, loaded strictly), the caches, and each training image's conditioning image
from the manifest (resized and centre-cropped with its target, mirrored with it; ``fluxpipe.conditioning``).
The ControlNet's residuals are added to the base model's image stream after every double block; the loss is
the LoRA trainer's flow-matching loss (l2 or l1: the reference passes no Huber threshold here). Output: the
ControlNet's weights in the reference's key layout (``<name>.safetensors`` and per-epoch / per-step files),
``<name>-loss.jsonl``, ``-state`` folders that resume exactly.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from fluxpipe.atomic import write_text_atomic
from fluxpipe.errors import FluxpipeError
from fluxpipe.models.controlnet import ControlledFlux, ControlNetFlux, load_controlnet_state
from fluxpipe.stages.train_full import TrainFullConfig, resume_state, write_state
from fluxpipe.stages.train_lora import _log_losses, check_segment, epoch_save_interval, flow_loss, load_dit, \
    plan_steps, prune_old, segment_suffix
from fluxpipe.train_data import CachedTensors, epoch_batches, load_items, make_batch
from fluxpipe.train_log import TrainLogger
from fluxpipe.train_state import restore_rng
from fluxpipe.train_weights import WeightOptimizers, modelspec, save_weights

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
        from fluxpipe.safetensors_file import read_header, read_tensors

        header = read_header(cfg.controlnet)
        load_controlnet_state(controlnet, read_tensors(cfg.controlnet, {k: k for k in header.tensors}))
    controlnet.gradient_checkpointing = cfg.gradient_checkpointing
    dtype = torch.bfloat16 if cfg.full_bf16 else torch.float32
    return controlnet.to(cfg.device, dtype).requires_grad_(True).train()


def conditioning_rows(cfg: TrainControlNetConfig, items: list) -> list[dict]:
    """Manifest rows of the training items, each with its conditioning image (else one error)."""
    from fluxpipe.tables import read_parquet

    rows = read_parquet(cfg.manifest)[0].to_dict("records")
    missing = [str(rows[it.row]["path"]) for it in items if not rows[it.row].get("conditioning")]
    if missing:
        raise FluxpipeError(f"{cfg.manifest}: {len(missing)} training images have no conditioning image (e.g. "
                            f"{missing[0]}); ControlNet training needs conditioning_data_dir in every subset of the "
                            "dataset TOML")
    return rows


def hints(rows: list[dict], items: list, batch: dict, images, device: str) -> Tensor:  # noqa: ANN001
    """[B, 3, H, W] control images of a batch, mirrored where the batch drew a flipped latent."""
    flipped = batch["flipped"].tolist()
    return torch.stack([images.get(rows[items[i].row], flip=f) for i, f in zip(batch["indices"], flipped,
                                                                              strict=True)]).to(device)


def save_controlnet(controlnet: ControlNetFlux, cfg: TrainControlNetConfig, suffix: str, step: int,
                    epoch: int) -> Path:
    meta = {**modelspec(f"flux-1-{cfg.variant}/controlnet", cfg.output_name), "ss_steps": str(step),
            "ss_epoch": str(epoch), "fluxpipe_settings": cfg.settings}
    path = save_weights(controlnet, cfg.output_dir / f"{cfg.output_name}{suffix}.safetensors", meta,
                        cfg.save_precision)
    log.info("saved %s (step %d, epoch %d)", path, step, epoch)
    return path


def train(cfg: TrainControlNetConfig) -> Path:
    """The ControlNet training loop; returns the final ControlNet file."""
    from fluxpipe.conditioning import ConditioningImages

    gen = torch.Generator().manual_seed(cfg.seed)
    items = load_items(cfg.manifest, cfg.latent_index, cfg.text_index, split="train")
    if not items:
        raise FluxpipeError(f"{cfg.manifest}: no training images (all in the validation split?)")
    rows, images = conditioning_rows(cfg, items), ConditioningImages()
    tensors = CachedTensors(cfg.latent_index, cfg.text_index)
    dit = load_dit(cfg).train()  # frozen, but in training mode: its blocks are checkpointed when asked
    controlnet = build_controlnet(cfg, dit.params)
    accum = cfg.gradient_accumulation_steps
    first_batches = epoch_batches(items, cfg.batch_sizes, 0, cfg.seed)
    total, epochs = plan_steps(len(first_batches), cfg)
    optim = WeightOptimizers(controlnet, cfg.optim, total)
    torch.manual_seed(cfg.seed)
    step, start_epoch, start_batch = 0, 0, 0
    state = resume_state(cfg)
    if state is not None:
        check_segment(cfg.stop_at_step, state.step)
        controlnet.load_state_dict(state.weights)
        optim.load_state_dict(state.optimizer)
        restore_rng(state.rng, {"noise": gen})
        step, start_epoch, start_batch = state.step, state.epoch, state.batch_in_epoch
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    loss_file = cfg.output_dir / f"{cfg.output_name}-loss.jsonl"
    records: list[dict] = []
    every_epochs = epoch_save_interval(cfg.save_every_n_epochs, cfg.save_n_epoch_ratio, epochs)
    logger = TrainLogger(cfg.logging_dir, cfg.log_prefix, window=math.ceil(len(first_batches) / accum))
    bar = tqdm(total=total, initial=step, desc=f"train {cfg.output_name}", unit="step", mininterval=2)
    epoch = start_epoch
    for epoch in range(start_epoch, epochs):
        batches = epoch_batches(items, cfg.batch_sizes, epoch, cfg.seed)
        first = start_batch if epoch == start_epoch else 0
        for bi in range(first, len(batches)):
            batch = make_batch(items, batches[bi], tensors, gen, cfg.device, cfg.compute_dtype)
            model = ControlledFlux(dit, controlnet, hints(rows, items, batch, images, cfg.device))
            with torch.autocast(torch.device(cfg.device).type, dtype=cfg.compute_dtype,
                                enabled=cfg.compute_dtype != torch.float32 and not cfg.full_bf16):
                loss = flow_loss(model, batch, cfg.math, gen)
            (loss / accum).backward()
            loss_value = loss.detach().item()
            if (bi + 1 - first) % accum and bi + 1 < len(batches):
                continue
            optim.step()
            step += 1
            records.append({"step": step, "epoch": epoch, "loss": loss_value, "lr": optim.lrs().popitem()[1]})
            average = logger.step(step, loss_value, optim.lrs())
            bar.set_postfix(loss=f"{loss_value:.4f}", avr_loss=f"{average:.4f}", epoch=epoch)
            bar.update(1)
            if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 and step < total:
                save_controlnet(controlnet, cfg, f"-step{step:08d}", step, epoch)
                if cfg.save_state:
                    write_state(controlnet, optim, gen, cfg, step, epoch, bi + 1, f"-step{step:08d}")
                prune_old(cfg, "step", step, cfg.save_every_n_steps)
            if step >= total or step == cfg.stop_at_step:
                break
        if step == cfg.stop_at_step and step < total:  # this segment ends; the next job resumes its state
            bar.close()
            logger.close()
            write_state(controlnet, optim, gen, cfg, step, epoch, bi + 1, segment_suffix(step))
            write_text_atomic(loss_file, "".join(json.dumps(r) + "\n" for r in
                                                 _log_losses(loss_file, records, state.step if state else 0)))
            optim.remove()
            tensors.close()
            return cfg.output_dir / f"{cfg.output_name}{segment_suffix(step)}-state"
        logger.epoch(epoch + 1)
        if step >= total:
            break
        if every_epochs and (epoch + 1) % every_epochs == 0 and epoch + 1 < epochs:
            save_controlnet(controlnet, cfg, f"-{epoch + 1:06d}", step, epoch + 1)
            if cfg.save_state:
                write_state(controlnet, optim, gen, cfg, step, epoch + 1, 0, f"-{epoch + 1:06d}")
            prune_old(cfg, "epoch", epoch + 1, every_epochs)
    bar.close()
    logger.close()
    write_text_atomic(loss_file, "".join(json.dumps(r) + "\n" for r in
                                         _log_losses(loss_file, records, state.step if state else 0)))
    if cfg.save_state:
        write_state(controlnet, optim, gen, cfg, step, epochs, 0, "")
    final = save_controlnet(controlnet, cfg, "", step, epoch + 1)
    optim.remove()
    tensors.close()
    return final
