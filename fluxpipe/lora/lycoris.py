"""LyCORIS networks (``--network_module lycoris.kohya``) through the ``lycoris-lora`` package, as the reference
trainer builds them, and the weight deltas of their files for fluxpipe's merge.

Training: ``LycorisFluxNetwork`` calls ``lycoris.kohya.create_network(multiplier, network_dim, network_alpha, vae,
text_encoders, unet, neuron_dropout=..., **network_args)`` and ``network.apply_to(...)`` exactly as sd-scripts'
train_network does. The package walks the DiT for modules of class ``DoubleStreamBlock`` / ``SingleStreamBlock``
(fluxpipe's model keeps BFL's class and attribute names) and adapts every Linear inside them, named
``lora_unet_double_blocks_0_img_attn_qkv`` etc. as in the kohya layout. fluxpipe trains the DiT only here.

Loading: ``module_delta`` computes each file module's delta W from its tensors alone (the package is not needed to
sample): LoKr ``kron(w1, w2) * alpha/r`` (w1, w2 full or a @ b), LoHa ``(w1a @ w1b) * (w2a @ w2b) * alpha/r``, full
``diff``; a ``dora_scale`` makes the merge DoRA's ``W' = (W + dW) * (m·(s/‖W + dW‖ − 1) + 1)`` (norm per output
row, or per input column when ``dora_scale`` is a row).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from fluxpipe.errors import CheckpointError, FluxpipeError

LYCORIS_SUFFIXES = frozenset(
    """lokr_w1 lokr_w1_a lokr_w1_b lokr_w2 lokr_w2_a lokr_w2_b lokr_t2 hada_w1_a hada_w1_b hada_w2_a hada_w2_b
hada_t1 hada_t2 diff diff_b dora_scale""".split()
)


def lycoris_kohya() -> ModuleType:
    """``lycoris.kohya``, or one line saying which extra to install."""
    try:
        from lycoris import kohya
    except ImportError:
        raise FluxpipeError(
            "--network_module lycoris.kohya: needs the package lycoris-lora, which is not installed: "
            "pip install 'fluxpipe[lycoris]' (or lycoris-lora)"
        ) from None
    return kohya


def network_kwargs(args: Sequence[str]) -> dict[str, str]:
    """--network_args as the reference hands them to a network module: key -> value string."""
    out = {}
    for arg in args:
        key, _, value = arg.partition("=")
        out[key.strip()] = value.strip()
    return out


class LycorisFluxNetwork(nn.Module):
    """A LyCORIS network over the DiT with FluxLoRANetwork's interface for the trainer (apply_to, param_groups,
    state_dict_kohya, load_kohya)."""

    def __init__(
        self,
        dit: nn.Module,
        args: Mapping[str, str],
        network_dim: int,
        network_alpha: float | None,
        dropout: float | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        kohya = lycoris_kohya()
        # as sd-scripts' train_network: create_network(1.0, dim, alpha, vae, text_encoders, unet, neuron_dropout=...)
        self.net = kohya.create_network(
            1.0, network_dim, network_alpha, None, None, dit, neuron_dropout=dropout, **args
        )
        if not self.net.unet_loras:
            raise FluxpipeError(f"--network_args {dict(args)}: LyCORIS found no DiT layer to adapt; check algo/preset")
        for lora in self.net.unet_loras:  # registered now so that weights load before apply_to (as FluxLoRANetwork)
            self.net.add_module(lora.lora_name, lora)
        self.net.to(dtype)
        self._dit = [dit]  # (not a submodule: the DiT's weights are not the network's)

    def apply_to(self) -> None:
        self.net.apply_to(None, self._dit[0], apply_text_encoder=False, apply_unet=True)

    def param_groups(
        self, *, learning_rate: float, unet_lr: float | None = None, **_ignored: Any
    ) -> list[dict[str, Any]]:
        """One group of every LyCORIS parameter at the DiT's rate (--unet_lr, else --learning_rate)."""
        lr = learning_rate if unet_lr is None else unet_lr
        params = [p for p in self.net.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "description": "unet"}] if lr else []

    def state_dict_kohya(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The file's tensors, keyed as the package writes them (``<lora_name>.<lokr_w1|hada_w1_a|...>``)."""
        return {
            k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()).contiguous()
            for k, v in self.net.state_dict().items()
        }

    def load_kohya(self, state_dict: Mapping[str, Tensor], strict: bool = True) -> tuple[list[str], list[str]]:
        missing, unexpected = self.net.load_state_dict(dict(state_dict), strict=strict)
        return list(missing), list(unexpected)


@dataclass(frozen=True)
class ModuleDelta:
    """The weight delta of one LyCORIS file module (alpha/rank applied), and its DoRA magnitude if any."""

    delta: Tensor  # [out, in], float32
    dora_scale: Tensor | None = None
    bias: Tensor | None = None


def _product(parts: Mapping[str, Tensor], full: str, a: str, b: str) -> tuple[Tensor, int | None]:
    """(the factor, its rank): ``full`` itself (no rank), else ``a @ b``."""
    if full in parts:
        return parts[full].float(), None
    if a not in parts or b not in parts:
        raise CheckpointError(f"LyCORIS module lacks {full} or {a}/{b}")
    return parts[a].float() @ parts[b].float(), parts[b].shape[0]


def _scale(parts: Mapping[str, Tensor], rank: int | None) -> float:
    """alpha / rank as the package loads it (alpha 0 or absent: the rank; no low-rank factor: 1)."""
    if rank is None:
        return 1.0
    alpha = float(parts["alpha"]) if "alpha" in parts else 0.0
    return (alpha or rank) / rank


def module_delta(name: str, parts: Mapping[str, Tensor]) -> ModuleDelta:
    """The delta of one module from its file tensors (LoKr, LoHa, full, or LoCon/LoRA down/up), checked."""
    if any(k in parts for k in ("lokr_t2", "hada_t1", "hada_t2", "lora_mid.weight")):
        raise CheckpointError(f"LyCORIS module {name!r}: Tucker factors are for convolutions, which FLUX has none of")
    if "lokr_w1" in parts or "lokr_w1_a" in parts:
        w1, r1 = _product(parts, "lokr_w1", "lokr_w1_a", "lokr_w1_b")
        w2, r2 = _product(parts, "lokr_w2", "lokr_w2_a", "lokr_w2_b")
        delta = torch.kron(w1, w2) * _scale(parts, r1 if r1 is not None else r2)
    elif "hada_w1_a" in parts:
        w1, rank = _product(parts, "", "hada_w1_a", "hada_w1_b")
        w2, _ = _product(parts, "", "hada_w2_a", "hada_w2_b")
        delta = w1 * w2 * _scale(parts, rank)
    elif "diff" in parts:
        delta = parts["diff"].float()
    elif "lora_down.weight" in parts and "lora_up.weight" in parts:
        down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
        delta = up @ down * _scale(parts, down.shape[0])
    else:
        raise CheckpointError(f"LyCORIS module {name!r} has no LoKr, LoHa, full or LoRA weights: {sorted(parts)}")
    dora = parts.get("dora_scale")
    return ModuleDelta(delta, None if dora is None else dora.float(), parts.get("diff_b"))


def dora_merge(weight: Tensor, dora_scale: Tensor, multiplier: float) -> Tensor:
    """DoRA's W' = W · (m·(s/‖W‖ − 1) + 1) on the already-added weight, the norm per output row ([out, 1] scale)
    or per input column ([1, in] scale), as LyCORIS merges it."""
    eps = torch.finfo(torch.float32).eps
    norm = (
        weight.norm(dim=1, keepdim=True) if dora_scale.shape[0] == weight.shape[0] else weight.norm(dim=0, keepdim=True)
    )
    scale = dora_scale / (norm + eps)
    return weight * (multiplier * (scale - 1) + 1)


@torch.no_grad()
def merge_delta(linear: nn.Linear, d: ModuleDelta, multiplier: float) -> None:
    """In place: W += multiplier * dW (DoRA: the magnitude rescale on W + dW), float32 maths, the weight's dtype."""
    w = linear.weight
    if tuple(w.shape) != tuple(d.delta.shape):
        raise CheckpointError(
            f"LyCORIS delta {tuple(d.delta.shape)} does not fit weight {tuple(w.shape)}: made for another model"
        )
    delta = d.delta.to(w.device)
    if d.dora_scale is not None:
        merged = dora_merge(w.float() + delta, d.dora_scale.to(w.device), multiplier)
    else:
        merged = w.float() + multiplier * delta
    linear.weight.data = merged.to(w.dtype)
    if d.bias is not None and linear.bias is not None:
        linear.bias.data = (linear.bias.float() + multiplier * d.bias.float().to(w.device)).to(linear.bias.dtype)


def attach_delta(linear: nn.Linear, d: ModuleDelta, multiplier: float) -> None:
    """Unmerged: the Linear's forward becomes forward(x) + multiplier · x @ dW^T (weights untouched, e.g. fp8
    storage); DoRA rescales the merged weight and so merges only."""
    if d.dora_scale is not None:
        raise CheckpointError(
            f"a DoRA module (dora_scale) for {tuple(linear.weight.shape)} merges only: sample without fp8"
        )
    if tuple(linear.weight.shape) != tuple(d.delta.shape):
        raise CheckpointError(f"LyCORIS delta {tuple(d.delta.shape)} does not fit weight {tuple(linear.weight.shape)}")
    delta = (multiplier * d.delta).to(linear.weight.device)
    bias = None if d.bias is None else (multiplier * d.bias.float()).to(linear.weight.device)
    previous = linear.forward
    if "_lora_base_forward" not in linear.__dict__:  # what fluxpipe.lora.files.detach_loras restores
        linear._lora_base_forward = linear.__dict__.get("forward")  # type: ignore[assignment]

    def forward(x: Tensor) -> Tensor:
        return previous(x) + nn.functional.linear(x, delta.to(x.dtype), None if bias is None else bias.to(x.dtype))

    linear.forward = forward  # type: ignore[method-assign, assignment]
