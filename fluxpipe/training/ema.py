"""An exponential moving average (EMA) of the trained weights, shared by the three trainers (fluxpipe's own
flags ``--ema_decay``, ``--ema_update_every``, ``--ema_on_cpu``, ``--ema_for_eval``; the reference has none).

Every ``update_every`` optimizer steps: shadow <- d * shadow + (1 - d) * weights (``torch._foreach_lerp_``),
with the warm-up of diffusers' ``EMAModel`` (its default, ``use_ema_warmup=False``; SimpleTuner uses that class):
the n-th update (n = 1, 2, ...) uses d_n = 0 for n = 1 (the shadow becomes the weights) and
min(decay, n / (n + 9)) = min(decay, (1 + t) / (10 + t)) with t = n - 1 after that. The shadow is fp32 (a bf16
EMA with a decay near 1 would not move), on the weights' device or, with ``on_cpu``, in host memory.
``torch.optim.swa_utils.AveragedModel`` is not used: it deep-copies the module (for a LoRA, the network holds
the whole DiT) and has no warm-up; its ``get_ema_multi_avg_fn`` is the same ``_foreach_lerp_`` as here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True, slots=True)
class EmaSettings:
    decay: float  # the target decay, 0 < decay < 1
    update_every: int = 1  # optimizer steps between updates
    on_cpu: bool = False  # keep the shadow in host memory (the full fine-tune's EMA is a whole DiT)
    for_eval: bool = False  # samples and the validation loss run on the EMA weights


def warmup_decay(decay: float, updates_done: int) -> float:
    """The decay of the next update after ``updates_done`` earlier ones (diffusers' EMAModel.get_decay)."""
    if updates_done <= 0:
        return 0.0
    return min(decay, (1 + updates_done) / (10 + updates_done))


CHUNK_BYTES = 1 << 28  # copies of the weights on the shadow's device made at once (--ema_on_cpu: host memory)


def ema_update(shadow: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """shadow <- decay * shadow + (1 - decay) * params, in place; params on another device or in another dtype
    are copied to the shadow's a chunk at a time (never a whole second copy of the model)."""
    with torch.no_grad():
        start = 0
        while start < len(shadow):
            end, size = start, 0
            while end < len(shadow) and (end == start or size + shadow[end].nbytes <= CHUNK_BYTES):
                size += shadow[end].nbytes
                end += 1
            source = [
                p.detach().to(s.device, s.dtype) for s, p in zip(shadow[start:end], params[start:end], strict=True)
            ]
            torch._foreach_lerp_(shadow[start:end], source, 1.0 - decay)
            start = end


class Ema:
    """The EMA of named parameters; ``state_dict`` / ``load_state_dict`` for training states (exact resume)."""

    def __init__(
        self, s: EmaSettings, named: dict[str, torch.nn.Parameter], on_change: Callable[[], None] | None = None
    ) -> None:
        self.params: list[torch.Tensor] = list(named.values())
        self.s, self.names = s, list(named)
        self.shadow = [p.detach().to("cpu" if s.on_cpu else p.device, torch.float32, copy=True) for p in self.params]
        self.updates = 0
        self.on_change = on_change  # called after the weights were swapped (a block swapper drops its copies)

    def update(self, step: int) -> bool:
        """After optimizer step ``step`` (1-based): update when it is due; whether it was."""
        if step % self.s.update_every:
            return False
        ema_update(self.shadow, self.params, warmup_decay(self.s.decay, self.updates))
        self.updates += 1
        return True

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": dict(zip(self.names, self.shadow, strict=True))}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if sorted(shadow) != sorted(self.names):
            raise ValueError("the state's EMA holds other weights than this run trains")
        with torch.no_grad():
            for name, s in zip(self.names, self.shadow, strict=True):
                s.copy_(shadow[name])
        self.updates = int(state["updates"])

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The EMA weights in the model for the block's duration, the trained ones restored exactly after it:
        exchanged tensor by tensor where dtype and device agree, else kept aside on the shadow's device."""
        kept: list[torch.Tensor | None] = []
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow, strict=True):
                same = p.dtype == s.dtype and p.device == s.device
                kept.append(None if same else p.detach().to(s.device, copy=True))
                if same:
                    _exchange(p, s)
                else:
                    p.copy_(s)
        self._changed()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s, k in zip(self.params, self.shadow, kept, strict=True):
                    if k is None:
                        _exchange(p, s)
                    else:
                        p.copy_(k)
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


def _exchange(a: torch.Tensor, b: torch.Tensor) -> None:
    tmp = a.detach().clone()
    a.copy_(b)
    b.copy_(tmp)


def create(s: EmaSettings | None, module: torch.nn.Module, on_change: Callable[[], None] | None = None) -> Ema | None:
    """The EMA of ``module``'s parameters, or None without ``--ema_decay``."""
    return None if s is None else Ema(s, dict(module.named_parameters()), on_change)


def save_beside(ema: Ema | None, save: Callable[[str], object], suffix: str) -> None:
    """``<name><suffix>-ema.safetensors`` beside the model file: ``save(suffix)`` run with the EMA swapped in."""
    if ema is not None:
        with ema.swapped():
            save(f"{suffix}-ema")


def ema_metadata(ema: Ema | None) -> dict[str, str]:
    return (
        {}
        if ema is None
        else {
            "ss_ema_decay": str(ema.s.decay),
            "ss_ema_update_every": str(ema.s.update_every),
            "ss_ema_updates": str(ema.updates),
        }
    )
