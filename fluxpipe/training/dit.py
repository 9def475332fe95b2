"""The frozen base DiT of the LoRA and ControlNet methods, on the device in the memory and speed modes asked."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import torch

from fluxpipe.errors import FluxpipeError
from fluxpipe.io.checkpoints import dit_slot, load_model

log = logging.getLogger(__name__)


class FrozenDit(Protocol):
    @property
    def flux(self) -> Path: ...
    @property
    def compute_dtype(self) -> torch.dtype: ...
    @property
    def device(self) -> str: ...
    @property
    def gradient_checkpointing(self) -> bool: ...
    @property
    def cpu_offload_checkpointing(self) -> bool: ...
    @property
    def fp8_base(self) -> bool: ...
    @property
    def blocks_to_swap(self) -> int: ...
    @property
    def torch_compile(self) -> bool: ...
    @property
    def dynamo_backend(self) -> str: ...


def load_dit(cfg: FrozenDit) -> torch.nn.Module:
    """The frozen DiT on the device: fp8 storage, block swap (swapped weights stay in pinned host memory),
    checkpointing mode and compiled blocks as configured."""
    swap = cfg.blocks_to_swap and cfg.device.startswith("cuda")
    slot = dit_slot(getattr(cfg, "model_type", "flux"))  # (the full/ControlNet configs have none: FLUX only)
    dit: Any = load_model(cfg.flux, slot, dtype=cfg.compute_dtype, device="cpu" if swap else cfg.device)
    dit.gradient_checkpointing = cfg.gradient_checkpointing
    dit.cpu_offload_checkpointing = cfg.cpu_offload_checkpointing
    if cfg.fp8_base:
        from fluxpipe.memory.fp8 import store_linears_fp8

        log.info("fp8_base: %d Linear weights stored as float8_e4m3fn", store_linears_fp8(dit))
    if swap:
        from fluxpipe.memory.block_swap import BlockSwapper

        try:
            swapper = BlockSwapper(dit, cfg.blocks_to_swap, cfg.device)
        except ValueError as e:
            raise FluxpipeError(f"{cfg.flux}: {e}") from e
        swapper.place(dit)
        dit.block_swapper = swapper
        log.info(
            "blocks_to_swap %d: %d double + %d single blocks stream %.2f GB from pinned host memory",
            cfg.blocks_to_swap,
            len(swapper.plan.double),
            len(swapper.plan.single),
            swapper.host_bytes() / 1e9,
        )
    if cfg.torch_compile:
        from fluxpipe.inference.sampler import compile_resident_blocks

        log.info(
            "torch_compile: %d blocks compiled (%s)",
            compile_resident_blocks(dit, cfg.dynamo_backend),
            cfg.dynamo_backend,
        )
    return dit
