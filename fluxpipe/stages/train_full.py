"""Full fine-tuning stage (`fluxpipe train full`, rule ``train_full``): every DiT parameter trained.

Input: the strict-loaded DiT, the manifest and both caches (text encoders and AE frozen, not even loaded: their
outputs are cached). Output: ``<output_dir>/<name>.safetensors`` (and ``-000001`` / ``-step00000100`` files) in
the official BFL layout with ModelSpec metadata naming the right variant, written one tensor at a time;
``<name>-loss.jsonl``; ``-state`` folders that restore the step and epoch counters (the reference's full
fine-tune does not). The maths is the LoRA trainer's (``flow_loss``); weights are fp32 with bf16/fp16 autocast,
or bf16 with ``--full_bf16``; optimizer modes in ``fluxpipe.training.weights``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
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
from fluxpipe.inference.sampler import ModelFiles
from fluxpipe.io.atomic import remove_stale_temps
from fluxpipe.io.checkpoints import load_model
from fluxpipe.parallel.distributed import World, world
from fluxpipe.stages.train_lora import (
    FlowSettings,
    build_monitor,
    check_segment,
    epoch_save_interval,
    flow_loss,
    log_step,
    plan_steps,
    prune_old,
    segment_suffix,
    write_losses,
)
from fluxpipe.training.ema import EmaSettings, ema_metadata, save_beside
from fluxpipe.training.ema import create as create_ema
from fluxpipe.training.log import TrainLogger
from fluxpipe.training.monitor import MonitorSettings
from fluxpipe.training.optim import canonical_optimizer
from fluxpipe.training.state import TrainState, capture_rng, load_state, newest_state, restore_rng, save_state
from fluxpipe.training.weights import OptimizerSettings, WeightOptimizers, modelspec, save_weights

log = logging.getLogger(__name__)
FSDP_OPTIMIZERS = ("AdamW", "SGDNesterov")  # torch.optim's: they step DTensor shards


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainFullConfig:
    flux: Path
    manifest: Path
    latent_index: Path
    text_index: Path
    output_dir: Path
    output_name: str
    batch_sizes: dict[int, int]
    variant: str  # "dev" / "schnell": the saved file's ModelSpec architecture
    math: FlowSettings = field(default_factory=FlowSettings)
    optim: OptimizerSettings = field(default_factory=OptimizerSettings)
    max_train_steps: int = 1600
    max_train_epochs: int | None = None
    gradient_accumulation_steps: int = 1
    compute_dtype: torch.dtype = torch.float32  # autocast dtype (bf16/fp16) or fp32
    full_bf16: bool = False  # the weights themselves in bf16 (fused Adafactor rounds stochastically)
    seed: int = 42
    gradient_checkpointing: bool = False
    cpu_offload_checkpointing: bool = False
    blocks_to_swap: int = 0
    save_every_n_epochs: int | None = None
    save_every_n_steps: int | None = None
    save_n_epoch_ratio: int | None = None
    save_precision: torch.dtype | None = None
    save_state: bool = False
    save_last_n_epochs: int | None = None
    save_last_n_epochs_state: int | None = None
    save_last_n_steps: int | None = None
    save_last_n_steps_state: int | None = None
    resume: Path | None = None
    auto_resume: bool = False
    device: str = "cpu"
    settings: str = ""  # digest of the settings and data: a state resumes only a run with the same one
    logging_dir: Path | None = None
    log_prefix: str = ""
    log_tracker_name: str = ""  # a subfolder of the run folder for the event files ("": none)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)  # samples and validation loss
    sample_models: ModelFiles | None = None
    t5_max_length: int = 512
    stop_at_step: int | None = None  # end this job (one segment of a chained run) at this step, state written
    ema: EmaSettings | None = (
        None  # --ema_decay: an EMA of the trained weights, <name>-ema.safetensors (fluxpipe.training.ema)
    )


def load_trainable_dit(cfg: TrainFullConfig) -> torch.nn.Module:
    """The DiT with every weight trainable; with --blocks_to_swap (on a GPU) the last blocks' Linear weights
    stay in pinned host memory, stream to the device for each use, and are updated there by the optimizer."""
    dtype = torch.bfloat16 if cfg.full_bf16 else torch.float32
    swap = cfg.blocks_to_swap and cfg.device.startswith("cuda")
    dit = load_model(cfg.flux, "flux", dtype=dtype, device="cpu" if swap else cfg.device)
    dit.gradient_checkpointing = cfg.gradient_checkpointing or cfg.cpu_offload_checkpointing
    dit.cpu_offload_checkpointing = cfg.cpu_offload_checkpointing
    dit.requires_grad_(True)
    if swap:
        from fluxpipe.memory.block_swap import BlockSwapper

        try:
            dit.block_swapper = BlockSwapper(dit, cfg.blocks_to_swap, cfg.device)
        except ValueError as e:
            raise FluxpipeError(f"{cfg.flux}: {e}") from e
        dit.block_swapper.place(dit)
        log.info(
            "blocks_to_swap %d: %.2f GB of trained weights stay in host memory (updated there)",
            cfg.blocks_to_swap,
            dit.block_swapper.host_bytes() / 1e9,
        )
    return dit.train()


def autocast(cfg: TrainFullConfig) -> contextlib.AbstractContextManager:
    """Mixed precision over fp32 weights; nothing to do with --full_bf16 or --mixed_precision no."""
    if cfg.full_bf16 or cfg.compute_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(cfg.device).type, dtype=cfg.compute_dtype)


def save_dit(
    dit: torch.nn.Module,
    cfg: TrainFullConfig,
    suffix: str,
    step: int,
    epoch: int,
    main: bool = True,
    extra: dict[str, str] | None = None,
) -> Path:
    """The DiT file (a sharded DiT is gathered tensor by tensor: every rank calls this; rank 0 writes)."""
    meta = {
        **modelspec(f"flux-1-{cfg.variant}", cfg.output_name),
        "ss_steps": str(step),
        "ss_epoch": str(epoch),
        "fluxpipe_settings": cfg.settings,
        **(extra or {}),
    }
    path = save_weights(dit, cfg.output_dir / f"{cfg.output_name}{suffix}.safetensors", meta, cfg.save_precision, main)
    if main:
        log.info("saved %s (step %d, epoch %d)", path, step, epoch)
    return path


def check_parallel(cfg: TrainFullConfig, w: World, sharded: bool) -> None:
    """Refuse, before any work, what data-parallel (torchrun) training cannot do."""
    if w.size == 1:
        return
    o = cfg.optim
    if o.fused_backward_pass or o.blockwise_fused_optimizers:
        raise FluxpipeError(
            "--fused_backward_pass / --blockwise_fused_optimizers update each weight from this "
            "process's gradient before the processes average theirs: run them in one process, or "
            "drop the flag under torchrun"
        )
    if sharded and (cfg.blocks_to_swap or cfg.cpu_offload_checkpointing):
        raise FluxpipeError(
            "--blocks_to_swap / --cpu_offload_checkpointing: under torchrun the full fine-tune "
            "shards the weights across the GPUs (FSDP2) instead; drop the flag"
        )
    if sharded and cfg.ema is not None:
        raise FluxpipeError(
            "--ema_decay: the EMA of FSDP-sharded weights is not implemented; train the full "
            "fine-tune with an EMA in one process (--ema_on_cpu keeps it in host memory)"
        )
    if sharded and canonical_optimizer(o.optimizer_type) not in FSDP_OPTIMIZERS:
        raise FluxpipeError(
            f"--optimizer_type {o.optimizer_type}: it cannot step FSDP-sharded weights; under "
            f"torchrun use one of {', '.join(FSDP_OPTIMIZERS)} (or train in one process)"
        )


def resume_state(cfg: TrainFullConfig, large: bool = True) -> TrainState | None:
    folder = cfg.resume or (newest_state(cfg.output_dir, cfg.output_name, cfg.settings) if cfg.auto_resume else None)
    if folder is None:
        return None
    state = load_state(folder, large=large)
    if state.extra.get("settings") != cfg.settings:
        raise FluxpipeError(
            f"{folder}: this state was made with other training settings; resume it with the same "
            "settings, or delete the state folder to start afresh"
        )
    log.info("resuming from %s at step %d (epoch %d, batch %d)", folder, state.step, state.epoch, state.batch_in_epoch)
    return state


def restore(model: torch.nn.Module, optim: WeightOptimizers, state: TrainState, w: World) -> None:
    """A state's weights and optimizer state into the (possibly sharded) model."""
    from fluxpipe.parallel import fsdp

    if not fsdp.is_sharded(model):
        model.load_state_dict(state.weights)
        optim.load_state_dict(state.optimizer)
        return
    fsdp.load_model_state(model, state.weights, w.main)
    fsdp.load_optimizer_state(model, optim.optimizers["main"], state.optimizer["optimizers"]["main"], w.main)
    for k, sched in optim.schedulers.items():
        sched.load_state_dict(state.optimizer["schedulers"][k])


def write_state(
    model,
    optim: WeightOptimizers,
    gen,
    cfg,
    step,
    epoch,
    batch_in_epoch,
    suffix,  # noqa: ANN001
    w: World | None = None,
    ema=None,
) -> None:  # noqa: ANN001
    """The trained module's weights (the DiT, or the ControlNet), the optimizers, counters and RNG states; a
    sharded model is gathered (every rank calls this), rank 0 writes."""
    from fluxpipe.parallel import fsdp

    w = w or World()
    if fsdp.is_sharded(model):
        weights = fsdp.model_state(model)
        optimizer = {
            "optimizers": {"main": fsdp.optimizer_state(model, optim.optimizers["main"])},
            "schedulers": {k: s.state_dict() for k, s in optim.schedulers.items()},
        }
    elif w.main:
        weights, optimizer = dict(model.state_dict()), optim.state_dict()
    if w.main:
        save_state(
            TrainState(
                step=step,
                epoch=epoch,
                batch_in_epoch=batch_in_epoch,
                weights=weights,
                optimizer=optimizer,
                scheduler={},
                rng=capture_rng({"noise": gen}),
                extra={"settings": cfg.settings, "ema": ema.state_dict() if ema is not None else None},
            ),
            cfg.output_dir / f"{cfg.output_name}{suffix}-state",
        )


def train(cfg: TrainFullConfig) -> Path:
    """The full fine-tuning loop (FSDP2 across torchrun's processes); returns the final DiT file, or, when a
    segment stops early, its state folder."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    items = load_items(cfg.manifest, cfg.latent_index, cfg.text_index, split="train")
    refuse_preservation(items, "full fine-tune")
    if not items:
        raise FluxpipeError(f"{cfg.manifest}: no training images (all in the validation split?)")
    w = world()  # data parallel: every rank walks the global batches (per-process batch x world size)
    check_parallel(cfg, w, sharded=True)
    accum = cfg.gradient_accumulation_steps
    if accum > 1 and (cfg.optim.fused_backward_pass or cfg.optim.blockwise_fused_optimizers):
        raise FluxpipeError(
            "--gradient_accumulation_steps > 1 cannot be combined with --fused_backward_pass or "
            "--blockwise_fused_optimizers (each backward pass updates the weights)"
        )
    tensors = CachedTensors(cfg.latent_index, cfg.text_index)
    dit = load_trainable_dit(cfg)
    if w.size > 1:
        from fluxpipe.parallel.fsdp import shard_dit

        shard_dit(dit)
        if w.main:
            log.info("FSDP2: every weight, gradient and optimizer moment sharded across %d processes", w.size)
    sizes = {k: v * w.size for k, v in cfg.batch_sizes.items()}
    first_batches = epoch_batches(items, sizes, 0, cfg.seed)
    total, epochs = plan_steps(len(first_batches), cfg)
    optim = WeightOptimizers(dit, cfg.optim, total)
    ema = create_ema(cfg.ema, dit, dit.block_swapper.invalidate if dit.block_swapper is not None else None)
    step, start_epoch, start_batch = 0, 0, 0
    state = resume_state(cfg, large=w.main or w.size == 1)  # sharded: rank 0 reads the tensors and broadcasts
    if state is not None:
        check_segment(cfg.stop_at_step, state.step)
        restore(dit, optim, state, w)
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
    # samples and validation run the trained weights as they are (fp32 or bf16), without autocast; on every
    # rank when sharded (each forward needs them all), written by rank 0
    monitor = build_monitor(cfg, dit, dit, tensors, None, [], logger, dtype=next(dit.parameters()).dtype, writes=w.main)
    if ema is not None and cfg.ema.for_eval:
        monitor.weights = ema.swapped
    monitor.at_start(step)

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
        if model_file:
            save_dit(dit, cfg, suffix, step, epoch, w.main)
            save_beside(ema, lambda s: save_dit(dit, cfg, s, step, epoch, w.main, ema_metadata(ema)), suffix)
        if state_too:
            write_state(dit, optim, gen, cfg, step, epoch, batch_in_epoch, suffix, w, ema)
        if w.main:
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
            batch = make_batch(
                epoch_items,
                batches[bi],
                tensors,
                gen,
                cfg.device,
                torch.bfloat16 if cfg.full_bf16 else cfg.compute_dtype,
            )
            rows, share = w.part(len(batches[bi]))
            # a rank left no rows of a short batch still runs one (weighted 0): every forward gathers from all ranks
            if w.size > 1:
                dit.set_requires_gradient_sync(boundary)
            with autocast(cfg):
                loss = flow_loss(dit, batch, cfg.math, gen, rows=(rows or [0]) if rows is not None else None)
            (loss * share / accum).backward()
            if not boundary:
                continue
            loss_value = float(w.mean(loss.detach(), len(rows) if rows is not None else 1))  # once a step
            optim.step()
            if dit.block_swapper is not None:
                dit.block_swapper.invalidate()  # the host weights changed: drop copies fetched before the step
            step += 1
            if ema is not None:
                ema.update(step)
            log_step(records, logger, bar, step, epoch, loss_value, optim.lrs())
            monitor.after_step(step, epoch)
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
        monitor.after_epoch(epoch + 1, step)
        if step >= total:
            break
        if every_epochs and (epoch + 1) % every_epochs == 0 and epoch + 1 < epochs:
            save_point(f"-{epoch + 1:06d}", step, epoch + 1, 0, "epoch", every_epochs)
    bar.close()
    logger.close()
    save_point("", step, epochs, 0, model_file=False)  # the final state (with --save_state) and the loss log
    save_beside(ema, lambda s: save_dit(dit, cfg, s, step, min(epoch + 1, epochs), w.main, ema_metadata(ema)), "")
    final = save_dit(dit, cfg, "", step, min(epoch + 1, epochs), w.main)
    optim.remove()
    tensors.close()
    w.barrier()
    return final
