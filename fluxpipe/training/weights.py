"""Shared pieces of the trainers that train whole weights (full fine-tune, ControlNet): the optimizer modes
and the saved model files.

Optimizer modes (spec §6.3): a plain optimizer stepped after ``backward``; ``--fused_backward_pass``
(Adafactor only: each parameter is updated in its gradient hook and its gradient freed at once); or
``--blockwise_fused_optimizers`` (one optimizer per block, stepped as soon as the block's gradients are all
there). One learning-rate scheduler per optimizer, stepped once per optimizer step in every mode.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fluxpipe import __version__
from fluxpipe.errors import FluxpipeError
from fluxpipe.training.optim import eval_weights


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizerSettings:
    optimizer_type: str = "AdamW"
    optimizer_args: dict = field(default_factory=dict)
    learning_rate: float = 1e-5
    lr_scheduler: str = "constant"
    lr_warmup_steps: int | float | str | None = None
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    lr_scheduler_type: str = ""  # a scheduler class (module.Class or a torch.optim.lr_scheduler name)
    lr_scheduler_args: dict = field(default_factory=dict)
    max_grad_norm: float = 1.0
    fused_backward_pass: bool = False
    blockwise_fused_optimizers: bool = False


class Optimizers:
    """The optimizer(s) and scheduler(s) of one run: ``step`` once per optimizer step, after the last backward
    (a ``GradScaler`` unscales before clipping and skips a step whose fp16 gradients overflowed)."""

    def __init__(
        self,
        optimizers: dict[str, torch.optim.Optimizer],
        schedulers: dict[str, Any],
        params: list[nn.Parameter],
        max_grad_norm: float,
        hooks: Any = None,  # noqa: ANN401 - the fused modes' hooks (they step inside backward)
        group_lrs: bool = False,  # lrs() by parameter group (the LoRA's), else the first scheduler's
    ) -> None:
        self.optimizers, self.schedulers, self.params = optimizers, schedulers, params
        self.max_grad_norm, self.hooks, self.group_lrs = max_grad_norm, hooks, group_lrs

    def step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """After the last backward of an optimizer step (the hooks already stepped in the fused modes)."""
        if self.hooks is None:
            main = self.optimizers["main"]
            if scaler is not None:
                scaler.unscale_(main)  # (a no-op unless fp16 on a GPU)
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            if scaler is not None:
                scaler.step(main)  # skips the step when an fp16 gradient overflowed, as accelerate does
                scaler.update()
            else:
                main.step()
            main.zero_grad(set_to_none=True)
        else:  # the hooks updated the weights outside optimizer.step(): tell the schedulers it happened
            for opt in self.optimizers.values():
                opt._opt_called = True  # type: ignore[attr-defined] # noqa: SLF001 - the flag torch's LRScheduler checks
        for sched in self.schedulers.values():
            sched.step()

    @contextlib.contextmanager
    def eval_weights(self) -> Iterator[None]:
        """Inside: a schedule-free optimizer's averaged weights in the parameters (others: nothing changes)."""
        with contextlib.ExitStack() as stack:
            for opt in self.optimizers.values():
                stack.enter_context(eval_weights(opt))
            yield

    def lrs(self) -> dict[str, float]:
        if self.group_lrs:
            return {g["description"]: g["lr"] for g in self.optimizers["main"].param_groups}
        return {name: sched.get_last_lr()[0] for name, sched in list(self.schedulers.items())[:1]}

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from fluxpipe.training.optim import load_optimizer_state

        for k, o in self.optimizers.items():
            load_optimizer_state(o, state["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])

    def remove(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()


class WeightOptimizers(Optimizers):
    """The optimizer(s) and scheduler(s) of a run over ``module``'s trainable parameters, in the mode asked."""

    def __init__(self, module: nn.Module, s: OptimizerSettings, total_steps: int) -> None:
        from fluxpipe.training.fused_optim import (
            BlockwiseFusedOptimizers,
            check_fused_options,
            enable_fused_backward,
            key_name,
        )
        from fluxpipe.training.optim import build_optimizer, build_scheduler, canonical_optimizer, resolve_warmup

        try:
            check_fused_options(
                s.fused_backward_pass, s.blockwise_fused_optimizers, canonical_optimizer(s.optimizer_type)
            )
        except ValueError as e:
            raise FluxpipeError(str(e)) from e
        params = [p for p in module.parameters() if p.requires_grad]

        def make(params: list[nn.Parameter]) -> torch.optim.Optimizer:
            return build_optimizer(
                s.optimizer_type, [{"params": params, "lr": s.learning_rate}], s.learning_rate, dict(s.optimizer_args)
            )

        clip = s.max_grad_norm or None
        hooks: Any = None
        if s.blockwise_fused_optimizers:
            hooks = BlockwiseFusedOptimizers(module, make, max_grad_norm=clip)
            optimizers = {key_name(k): o for k, o in hooks.optimizers.items()}
        else:
            optimizers = {"main": make(params)}
            if s.fused_backward_pass:
                hooks = enable_fused_backward(optimizers["main"], max_grad_norm=clip)
        warmup = resolve_warmup(s.lr_warmup_steps, total_steps)
        schedulers = {
            k: build_scheduler(
                s.lr_scheduler,
                o,
                total_steps,
                warmup,
                s.lr_scheduler_num_cycles,
                s.lr_scheduler_power,
                scheduler_type=s.lr_scheduler_type,
                scheduler_args=dict(s.lr_scheduler_args),
            )
            for k, o in optimizers.items()
        }
        super().__init__(optimizers, schedulers, params, s.max_grad_norm, hooks)


def modelspec(architecture: str, title: str) -> dict[str, str]:
    """ModelSpec metadata of a saved model file (the variant named correctly: the reference writes flux-1-dev
    for schnell too)."""
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "https://github.com/black-forest-labs/flux",
        "modelspec.title": title,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.implementation_version": f"fluxpipe/{__version__}",
    }


def save_weights(
    module: nn.Module, path: Path, metadata: dict[str, str], dtype: torch.dtype | None, main: bool = True
) -> Path:
    """The module's state dict (official key names, no prefix) as safetensors, one tensor at a time, atomically;
    floating tensors cast to ``dtype`` when given (--save_precision). Only the ``main`` process writes; a
    sharded (FSDP) module is gathered one tensor at a time, so every process must call this."""
    from fluxpipe.io.safetensors_file import save_safetensors_streaming
    from fluxpipe.parallel.fsdp import full, is_sharded

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t.detach()

    tensors = {k: cast(v) for k, v in module.state_dict().items()}
    sharded = is_sharded(module)
    if main:
        save_safetensors_streaming(tensors, path, metadata, fetch=full if sharded else None)
    elif sharded:
        for t in tensors.values():  # the gathers rank 0 makes while writing, in its order
            full(t)
    return path
