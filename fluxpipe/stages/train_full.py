"""Full fine-tuning stage (`fluxpipe train full`, rule ``train_full``): every DiT parameter trained.

Input: the strict-loaded DiT, the manifest and both caches (text encoders and AE frozen, not even loaded: their
outputs are cached). Output: ``<output_dir>/<name>.safetensors`` (and ``-000001`` / ``-step00000100`` files) in
the official BFL layout with ModelSpec metadata naming the right variant, written one tensor at a time;
``<name>-loss.jsonl``; ``-state`` folders that restore the step and epoch counters (the reference's full
fine-tune does not). The loop and the maths are the shared ones (``fluxpipe.training.engine``, ``flow_loss``); weights are fp32 with bf16/fp16 autocast,
or bf16 with ``--full_bf16``; optimizer modes in ``fluxpipe.training.weights``.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

from fluxpipe.data.batches import refuse_preservation
from fluxpipe.errors import FluxpipeError
from fluxpipe.io.checkpoints import load_model
from fluxpipe.parallel.distributed import World, world
from fluxpipe.training.configs import FSDP_OPTIMIZERS, TrainFullConfig, check_parallel
from fluxpipe.training.ema import create as create_ema
from fluxpipe.training.engine import Method, TrainData, load_data, train_loop
from fluxpipe.training.loss import flow_loss
from fluxpipe.training.monitor import build_monitor
from fluxpipe.training.settings import LoopSettings
from fluxpipe.training.state import TrainState
from fluxpipe.training.weights import Optimizers, WeightOptimizers, modelspec, save_weights

__all__ = ["FSDP_OPTIMIZERS", "TrainFullConfig", "check_parallel", "run", "train"]
log = logging.getLogger(__name__)


def load_trainable_dit(cfg: TrainFullConfig) -> torch.nn.Module:
    """The DiT with every weight trainable; with --blocks_to_swap (on a GPU) the last blocks' Linear weights
    stay in pinned host memory, stream to the device for each use, and are updated there by the optimizer."""
    dtype = torch.bfloat16 if cfg.full_bf16 else torch.float32
    swap = cfg.blocks_to_swap and cfg.device.startswith("cuda")
    dit: Any = load_model(cfg.flux, "flux", dtype=dtype, device="cpu" if swap else cfg.device)
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


def restore(model: torch.nn.Module, optim: Optimizers, state: TrainState, w: World) -> None:
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


def capture(model: torch.nn.Module, optim: Optimizers) -> tuple[dict, dict, dict]:
    """The trained module's weights and the optimizers' state for a state folder; a sharded model is gathered
    (every rank calls this)."""
    from fluxpipe.parallel import fsdp

    if not fsdp.is_sharded(model):
        return dict(model.state_dict()), optim.state_dict(), {}
    optimizer = {
        "optimizers": {"main": fsdp.optimizer_state(model, optim.optimizers["main"])},
        "schedulers": {k: s.state_dict() for k, s in optim.schedulers.items()},
    }
    return fsdp.model_state(model), optimizer, {}


def check_fused(cfg: TrainFullConfig) -> None:
    if cfg.gradient_accumulation_steps > 1 and (cfg.optim.fused_backward_pass or cfg.optim.blockwise_fused_optimizers):
        raise FluxpipeError(
            "--gradient_accumulation_steps > 1 cannot be combined with --fused_backward_pass or "
            "--blockwise_fused_optimizers (each backward pass updates the weights)"
        )


def full_method(cfg: TrainFullConfig, s: LoopSettings, d: TrainData, w: World) -> Method:
    dit: Any = load_trainable_dit(cfg)
    if w.size > 1:
        from fluxpipe.parallel.fsdp import shard_dit

        shard_dit(dit)
        if w.main:
            log.info("FSDP2: every weight, gradient and optimizer moment sharded across %d processes", w.size)
    optim = WeightOptimizers(dit, cfg.optim, d.total)
    swapper = dit.block_swapper
    ema = create_ema(cfg.ema, dit, swapper.invalidate if swapper is not None else None)

    def loss(batch: dict, gen: torch.Generator, rows: list[int] | None, indices: list[int]) -> torch.Tensor:
        # a rank left no rows of a short batch still runs one (weighted 0): every forward gathers from all ranks
        with autocast(cfg):
            return flow_loss(dit, batch, cfg.math, gen, rows=(rows or [0]) if rows is not None else None)

    def sync(boundary: bool) -> contextlib.AbstractContextManager:
        if w.size > 1:
            dit.set_requires_gradient_sync(boundary)
        return contextlib.nullcontext()

    def monitor(logger: Any, writes: bool) -> Any:  # noqa: ANN401
        # samples and validation run the trained weights as they are (fp32 or bf16), without autocast
        return build_monitor(s, dit, dit, d.tensors, logger, dtype=next(dit.parameters()).dtype, writes=writes)

    return Method(
        optim=optim,
        loss=loss,
        save=lambda suffix, step, epoch, extra: save_dit(dit, cfg, suffix, step, epoch, w.main, extra),
        capture=lambda: capture(dit, optim),
        restore=lambda state: restore(dit, optim, state, w),
        monitor=monitor,
        batch_dtype=torch.bfloat16 if cfg.full_bf16 else cfg.compute_dtype,
        sync=sync,
        after_step=swapper.invalidate if swapper is not None else lambda: None,  # the host weights changed
        ema=ema,
        sharded=w.size > 1,
    )


def run(cfg: TrainFullConfig) -> Path:
    """The full fine-tune (FSDP2 across torchrun's processes); returns the final DiT file, or, when a segment
    stops early, its state folder."""
    torch.manual_seed(cfg.seed)
    w = world()  # data parallel: every rank walks the global batches (per-process batch x world size)
    check_parallel(cfg, w, sharded=True)
    check_fused(cfg)
    s = LoopSettings.of(cfg)
    d = load_data(s, w)
    refuse_preservation(d.items, "full fine-tune")
    return train_loop(s, full_method(cfg, s, d, w), d)


train = run
