"""Training-side LoRA for FLUX.1: the reference ``networks.lora_flux`` semantics (spec §5.1-5.7).

``LoRAModule`` adds ``multiplier * alpha/rank * up(down(x))`` to one nn.Linear by patching that Linear's
``forward``; the Linear stays in the model tree, so base-model keys never change. ``FluxLoRANetwork`` creates
the modules for the DiT (+ CLIP-L, + T5 with ``train_t5xxl``) from a ``LoraSpec`` (rank, alpha, dropouts and
the reference's ``--network_args``, see ``parse_network_args``), builds optimizer param groups (LR per part,
LoRA+, regex LRs), and saves / loads the kohya layout that ``fluxpipe.lora.files.apply_lora`` merges:
``<lora name>.lora_down.weight [r, in]``, ``.lora_up.weight [out, r]``, ``.alpha []`` (all in the save dtype).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxpipe.errors import CheckpointError, summarize
from fluxpipe.io.safetensors_file import save_safetensors
from fluxpipe.lora.files import lora_targets

log = logging.getLogger(__name__)

# per-type rank keys -> the substrings of the LoRA name they select, in the reference's order (first match wins)
TYPE_DIMS = {
    "img_attn_dim": ("img_attn",),
    "txt_attn_dim": ("txt_attn",),
    "img_mlp_dim": ("img_mlp",),
    "txt_mlp_dim": ("txt_mlp",),
    "img_mod_dim": ("img_mod",),
    "txt_mod_dim": ("txt_mod",),
    "single_dim": ("single_blocks", "linear"),
    "single_mod_dim": ("modulation",),
}
IN_LAYERS = ("img_in", "time_in", "vector_in", "guidance_in", "txt_in")  # order of the 5 `in_dims` values
TE_TARGET_CLASSES = frozenset({"CLIPAttention", "CLIPSdpaAttention", "CLIPMLP", "T5Attention", "T5DenseGatedActDense"})
_BLOCK = re.compile(r"lora_unet_(double|single)_blocks_(\d+)_")
Plan = list[tuple[str, nn.Linear, int]]  # (LoRA name, target Linear, rank; 0 = skipped)


class LoRAModule(nn.Module):
    """LoRA branch of one nn.Linear: y = W x (+b) + multiplier * (alpha / rank) * up(down(x)).
    x [..., in] -> y [..., out]. down [rank, in] is Kaiming-uniform (a=√5), up [out, rank] zero, no biases.
    The branch runs in the LoRA weights' dtype (x is cast to it); its output is cast back to y's dtype.
    Training mode only: ``dropout`` on the rank activation, ``rank_dropout`` zeroes random rank channels per
    sample (scale × 1/(1-p)), ``module_dropout`` skips the whole branch with probability p.
    """

    alpha: Tensor  # a registered buffer (saved as ``<name>.alpha``)

    def __init__(
        self,
        lora_name: str,
        org: nn.Linear,
        rank: int,
        alpha: float | None,
        *,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"{lora_name}: LoRA rank must be >= 1, got {rank}")
        self.lora_name, self.rank, self.multiplier = lora_name, rank, multiplier
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        device = org.weight.device  # a meta model gives meta LoRA weights
        self.lora_down = nn.Linear(org.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_up = nn.Linear(rank, org.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.zeros((), dtype=torch.float32, device=org.weight.device))
        self.set_alpha(alpha)
        self._org = (org,)  # a tuple, so the wrapped Linear is not registered as a submodule
        self._org_forward: Callable[[Tensor], Tensor] | None = None
        self._instance_forward: Callable[[Tensor], Tensor] | None = None  # a forward already patched on `org`

    @torch.no_grad()
    def set_alpha(self, alpha: float | None) -> None:
        """alpha None or 0 means alpha = rank (scale 1)."""
        value = float(alpha) if alpha else float(self.rank)
        self.alpha.fill_(value)
        self.scale = value / self.rank

    def apply_to(self) -> None:
        """Route the wrapped Linear's forward through this module (idempotent)."""
        if self._org_forward is None:
            org = self._org[0]
            self._org_forward, self._instance_forward = org.forward, org.__dict__.get("forward")
            org.__dict__["forward"] = self.forward  # an instance attribute, as assigning org.forward makes

    def remove(self) -> None:
        """Give the wrapped Linear its original forward back."""
        if self._org_forward is not None:
            if self._instance_forward is None:
                del self._org[0].forward  # back to the class's forward
            else:
                self._org[0].__dict__["forward"] = self._instance_forward
            self._org_forward = None

    def forward(self, x: Tensor) -> Tensor:
        out = self._org_forward(x)  # type: ignore[misc]  # only reachable through the patched Linear
        if self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            return out
        return out + self.delta(x).to(out.dtype)

    def delta(self, x: Tensor) -> Tensor:
        """multiplier * scale * up(down(x)) in the LoRA dtype, [..., out]."""
        lx = self.lora_down(x.to(self.lora_down.weight.dtype))
        scale = self.scale
        if self.training and self.dropout:
            lx = F.dropout(lx, p=self.dropout)
        if self.training and self.rank_dropout:
            shape = (lx.shape[0],) + (1,) * (lx.ndim - 2) + (self.rank,) if lx.ndim >= 2 else (self.rank,)
            lx = lx * (torch.rand(shape, device=lx.device) > self.rank_dropout).to(lx.dtype)
            scale = scale / (1.0 - self.rank_dropout)  # as if the rank were reduced (reference)
        return self.lora_up(lx) * (self.multiplier * scale)


@dataclass(frozen=True, kw_only=True, slots=True)
class LoraSpec:
    """Resolved LoRA settings: CLI values plus parsed ``--network_args`` (spec §5.1, §5.2, §5.4, §5.6).
    network_dim / network_alpha: default rank and alpha (alpha None or 0 -> rank). dropout: ``--network_dropout``.
    train_blocks: "all" | "single" | "double". train_*_block_indices: None = all, else the 0-based indices kept.
    *_dim (TYPE_DIMS): rank per layer type in the blocks, 0 disables, None = network_dim.
    in_dims: ranks for (img_in, time_in, vector_in, guidance_in, txt_in); None = no conditioning LoRA.
    network_reg_dims: (regex, rank) searched in the LoRA name, first match wins, bypasses type dims and
    block indices (not train_blocks). network_reg_lrs: (regex, lr), first match wins. loraplus_*: LoRA+ ratios.
    """

    network_dim: int = 4
    network_alpha: float | None = 1.0
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    train_blocks: str = "all"
    train_double_block_indices: frozenset[int] | None = None
    train_single_block_indices: frozenset[int] | None = None
    img_attn_dim: int | None = None
    txt_attn_dim: int | None = None
    img_mlp_dim: int | None = None
    txt_mlp_dim: int | None = None
    img_mod_dim: int | None = None
    txt_mod_dim: int | None = None
    single_dim: int | None = None
    single_mod_dim: int | None = None
    in_dims: tuple[int, int, int, int, int] | None = None
    network_reg_dims: tuple[tuple[str, int], ...] = ()
    network_reg_lrs: tuple[tuple[str, float], ...] = ()
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    train_t5xxl: bool = False
    verbose: bool = False

    def __post_init__(self) -> None:
        checks = {
            "network_dim": (self.network_dim >= 0, ">= 0"),
            "train_blocks": (self.train_blocks in ("all", "single", "double"), "all, single or double"),
            "dropout": (0 <= (self.dropout or 0) < 1, "in [0, 1)"),
            "rank_dropout": (0 <= (self.rank_dropout or 0) < 1, "in [0, 1)"),
            "module_dropout": (0 <= (self.module_dropout or 0) <= 1, "in [0, 1]"),
            "in_dims": (
                self.in_dims is None or (len(self.in_dims) == 5 and min(self.in_dims) >= 0),
                "5 ranks >= 0 (img, time, vector, guidance, txt)",
            ),
        }
        for key, (ok, rule) in checks.items():
            if not ok:
                raise ValueError(f"LoRA {key} must be {rule}, got {getattr(self, key)!r}")


# ---- --network_args parsing ------------------------------------------------------------------------------
def parse_block_indices(text: str) -> frozenset[int] | None:
    """'all' -> None; 'none' or '' -> empty; '0,1,4-5,7' -> {0, 1, 4, 5, 7} (ranges inclusive)."""
    s = text.strip().lower()
    if s in ("all", "none", ""):
        return None if s == "all" else frozenset()
    out: set[int] = set()
    for part in (p.strip() for p in s.split(",")):
        if not (m := re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)) or int(m[2] or m[1]) < int(m[1]):
            raise ValueError(f"{part!r} is not a block index or an increasing range like 4-5")
        out.update(range(int(m[1]), int(m[2] or m[1]) + 1))
    return frozenset(out)


def _checked(convert: Callable[[str], Any], ok: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if not ok(value := convert(text.strip())):
            raise ValueError(f"{value} is {what}")
        return value

    return parse


_rank = _checked(int, lambda v: v >= 0, "negative")
_ratio = _checked(float, lambda v: math.isfinite(v) and v > 0, "not a positive number")
_bool = _checked(str.lower, lambda v: v in ("true", "false"), "not True or False")


def _in_dims(text: str) -> tuple[int, ...]:
    s = text.strip()
    dims = tuple(_rank(d) for d in (s[1:-1] if s.startswith("[") and s.endswith("]") else s).split(","))
    if len(dims) != 5:
        raise ValueError(f"needs 5 ranks (img, time, vector, guidance, txt), got {len(dims)}")
    return dims


def _regex_pairs(text: str, convert: Callable[[str], Any]) -> tuple[tuple[str, Any], ...]:
    pairs = []
    for item in (p.strip() for p in text.split(",") if p.strip()):
        pattern, sep, value = item.rpartition("=")
        if not sep or not pattern:
            raise ValueError(f"{item!r} is not regex=value")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"bad regex {pattern!r}: {e}") from None
        pairs.append((pattern, convert(value)))
    return tuple(pairs)


_PARSERS: dict[str, Callable[[str], Any]] = {
    **dict.fromkeys(TYPE_DIMS, _rank),
    "rank_dropout": float,
    "module_dropout": float,
    "train_blocks": str.lower,
    "in_dims": _in_dims,
    **dict.fromkeys(("train_double_block_indices", "train_single_block_indices"), parse_block_indices),
    "network_reg_dims": lambda s: _regex_pairs(s, _rank),
    "network_reg_lrs": lambda s: _regex_pairs(s, float),
    **dict.fromkeys(("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"), _ratio),
    **dict.fromkeys(("train_t5xxl", "verbose"), lambda s: _bool(s) == "true"),
    # accepted, then dropped: FLUX has no Conv2d targets (spec §5.4); split_qkv=False is the default
    "conv_dim": _rank,
    "conv_alpha": float,
    "split_qkv": _checked(str.lower, lambda v: v == "false", "not supported (broken in the reference, spec §5.5)"),
}
_DROPPED = frozenset({"conv_dim", "conv_alpha", "split_qkv"})


def parse_network_args(args: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` (the reference's --network_args) -> typed LoraSpec keyword arguments;
    ValueError naming the argument for unknown or repeated keys and for bad values."""
    out: dict[str, Any] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"network_args {arg!r}: expected key=value")
        if key not in _PARSERS:
            raise ValueError(f"network_args: unknown key {key!r}; known keys: {', '.join(sorted(_PARSERS))}")
        if key in out:
            raise ValueError(f"network_args: {key!r} is given twice")
        try:
            out[key] = _PARSERS[key](value.strip())
        except ValueError as e:
            raise ValueError(f"network_args {key}={value!r}: {e}") from None
    return {k: v for k, v in out.items() if k not in _DROPPED}


# ---- rank resolution per target ---------------------------------------------------------------------------
def _reg_match(name: str, spec: LoraSpec) -> int | None:
    """Rank of the first network_reg_dims regex found in ``name`` (None: none matches)."""
    return next((rank for pattern, rank in spec.network_reg_dims if re.search(pattern, name)), None)


def _reg_rank(name: str, spec: LoraSpec, default: int) -> int:
    """Rank of the first network_reg_dims regex found in ``name``, else ``default``."""
    reg = _reg_match(name, spec)
    return default if reg is None else reg


def _block_rank(name: str, kind: str, index: int, spec: LoraSpec) -> int:
    """Type dims, then the block-index filter; a network_reg_dims match bypasses both (as the code does)."""
    if (reg := _reg_match(name, spec)) is not None:
        return reg
    rank = next(
        (d for key, ids in TYPE_DIMS.items() if (d := getattr(spec, key)) is not None and all(i in name for i in ids)),
        spec.network_dim,
    )
    kept = spec.train_double_block_indices if kind == "double" else spec.train_single_block_indices
    return 0 if kept is not None and index not in kept else rank


def unet_plan(flux: nn.Module, spec: LoraSpec) -> Plan:
    """Every DiT target of spec §5.2 with its rank: block layers first, then conditioning layers (in_dims)."""
    for key, count in (
        ("train_double_block_indices", len(list(flux.get_submodule("double_blocks").children()))),
        ("train_single_block_indices", len(list(flux.get_submodule("single_blocks").children()))),
    ):
        if (kept := getattr(spec, key)) and max(kept) >= count:
            raise ValueError(f"{key}: index {max(kept)} out of range; the model has {count} blocks (0-{count - 1})")
    kinds = ("double", "single") if spec.train_blocks == "all" else (spec.train_blocks,)
    blocks, conditioning = [], []
    for name, linear in lora_targets(flux, "lora_unet").items():
        if m := _BLOCK.match(name):
            if m.group(1) in kinds:
                blocks.append((name, linear, _block_rank(name, m.group(1), int(m.group(2)), spec)))
            continue
        layer = next((i for i, n in enumerate(IN_LAYERS) if re.match(f"lora_unet_{n}(_|$)", name)), None)
        if layer is not None and spec.in_dims is not None:  # never final_layer
            conditioning.append((name, linear, _reg_rank(name, spec, spec.in_dims[layer])))
    return blocks + conditioning


def text_encoder_plan(model: nn.Module, prefix: str, spec: LoraSpec) -> Plan:
    """The Linear layers inside CLIP/T5 attention and MLP modules, with their ranks."""
    inside = {
        id(c)
        for m in model.modules()
        if type(m).__name__ in TE_TARGET_CLASSES
        for c in m.modules()
        if isinstance(c, nn.Linear)
    }
    return [
        (name, linear, _reg_rank(name, spec, spec.network_dim))
        for name, linear in lora_targets(model, prefix).items()
        if id(linear) in inside
    ]


# ---- the network ------------------------------------------------------------------------------------------
class FluxLoRANetwork(nn.Module):
    """All LoRA modules of one run, registered under their kohya names (``state_dict()`` is the file layout).
    Scope (spec §5.2): the DiT unless ``train_unet=False``; CLIP-L (``lora_te1``) when given and
    ``train_text_encoder``; T5 (``lora_te3``) only with ``spec.train_t5xxl``. Works on meta-device models."""

    def __init__(
        self,
        flux: nn.Module | None,
        spec: LoraSpec,
        *,
        clip_l: nn.Module | None = None,
        t5xxl: nn.Module | None = None,
        train_unet: bool = True,
        train_text_encoder: bool = True,
        multiplier: float = 1.0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.spec, self.multiplier = spec, multiplier
        plan: Plan = []
        if train_text_encoder and clip_l is not None:
            plan += text_encoder_plan(clip_l, "lora_te1", spec)
        if train_text_encoder and spec.train_t5xxl:
            if t5xxl is None:
                raise ValueError("train_t5xxl=True needs the T5-XXL model")
            plan += text_encoder_plan(t5xxl, "lora_te3", spec)
        if train_unet:
            if flux is None:
                raise ValueError("training the DiT LoRA needs the FLUX model")
            plan += unet_plan(flux, spec)
        self.loras: list[LoRAModule] = []  # text encoders first, then the DiT
        for name, linear, rank in plan:
            if spec.verbose:
                log.info("LoRA %-60s %s", name, f"rank {rank} alpha {spec.network_alpha}" if rank else "skipped")
            if rank:
                self.loras.append(
                    LoRAModule(
                        name,
                        linear,
                        rank,
                        spec.network_alpha,
                        multiplier=multiplier,
                        dtype=dtype,
                        dropout=spec.dropout,
                        rank_dropout=spec.rank_dropout,
                        module_dropout=spec.module_dropout,
                    )
                )
                self.add_module(name, self.loras[-1])
        self.unet_loras = [m for m in self.loras if m.lora_name.startswith("lora_unet")]
        self.text_encoder_loras = [m for m in self.loras if not m.lora_name.startswith("lora_unet")]
        log.info("LoRA: %d DiT modules, %d text-encoder modules", len(self.unet_loras), len(self.text_encoder_loras))

    def apply_to(self) -> None:
        for m in self.loras:
            m.apply_to()

    def remove(self) -> None:
        for m in self.loras:
            m.remove()

    def set_multiplier(self, multiplier: float) -> None:
        """Every module's multiplier (0: the base model; differential output preservation)."""
        self.multiplier = multiplier
        for m in self.loras:
            m.multiplier = multiplier

    @torch.no_grad()
    def state_dict_kohya(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """``<name>.lora_down.weight / .lora_up.weight / .alpha`` on CPU in ``dtype`` (None: the LoRA dtype)."""
        return {
            f"{m.lora_name}.{key}": t.detach().to("cpu", dtype or m.lora_down.weight.dtype).clone()
            for m in self.loras
            for key, t in (
                ("lora_down.weight", m.lora_down.weight),
                ("lora_up.weight", m.lora_up.weight),
                ("alpha", m.alpha),
            )
        }

    @torch.no_grad()
    def load_kohya(self, state_dict: Mapping[str, Tensor], strict: bool = True) -> tuple[list[str], list[str]]:
        """Load a kohya-layout LoRA (``--network_weights``); returns the (missing, unexpected) keys. strict: any
        missing or unexpected key is a CheckpointError listing them. Shape mismatches always raise."""
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
        if strict and (missing or unexpected):
            raise CheckpointError(
                f"LoRA weights do not match this network: {len(missing)} missing "
                f"({summarize(missing)}), {len(unexpected)} unexpected ({summarize(unexpected)}); "
                "check network_dim / network_args (train_blocks, *_dim, in_dims, train_t5xxl)"
            )
        common = [k for k in own if k in state_dict]
        if bad := [f"{k} {tuple(state_dict[k].shape)}" for k in common if state_dict[k].shape != own[k].shape]:
            raise CheckpointError(f"LoRA weights with other shapes than the network's: {summarize(bad)}")
        for key in common:
            own[key].copy_(state_dict[key])
        for m in self.loras:
            m.set_alpha(float(m.alpha))  # refresh the cached scale
        return missing, unexpected

    def param_groups(
        self,
        *,
        learning_rate: float,
        unet_lr: float | None = None,
        text_encoder_lr: float | Sequence[float] | None = None,
        loraplus_lr_ratio: float | None = None,
        loraplus_unet_lr_ratio: float | None = None,
        loraplus_text_encoder_lr_ratio: float | None = None,
        reg_lrs: Sequence[tuple[str, float]] = (),
    ) -> list[dict[str, Any]]:
        """Optimizer groups ``{"params", "lr", "description"}`` (spec §5.6). unet_lr / text_encoder_lr default to
        learning_rate; text_encoder_lr: 1 value (both) or 2 (CLIP-L, T5). LoRA+ scales the lr of lora_up weights;
        ``reg_lrs`` (regex, lr) groups come first in each part. Groups with lr 0 or None are dropped (frozen)."""
        te = [text_encoder_lr] if isinstance(text_encoder_lr, (int, float)) else list(text_encoder_lr or [])
        if len(te) > 2:
            raise ValueError(f"text_encoder_lr takes 1 or 2 values (CLIP-L, T5), got {len(te)}")
        te = {0: [learning_rate] * 2, 1: te * 2, 2: te}[len(te)]
        te_ratio = loraplus_text_encoder_lr_ratio or loraplus_lr_ratio
        parts = [
            ("textencoder 1", "lora_te1", te[0], te_ratio),
            ("textencoder 2", "lora_te3", te[1], te_ratio),
            (
                "unet",
                "lora_unet",
                learning_rate if unet_lr is None else unet_lr,
                loraplus_unet_lr_ratio or loraplus_lr_ratio,
            ),
        ]
        return [
            group
            for desc, prefix, lr, ratio in parts
            for group in _part_groups(
                desc, [m for m in self.loras if m.lora_name.startswith(prefix)], lr, ratio, reg_lrs
            )
        ]

    def save(
        self, path: str | Path, metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None
    ) -> None:
        """Atomic safetensors write of ``state_dict_kohya(dtype)`` with string metadata."""
        save_safetensors(self.state_dict_kohya(dtype), path, metadata)


def _part_groups(
    desc: str, loras: list[LoRAModule], lr: float | None, ratio: float | None, reg_lrs: Sequence[tuple[str, float]]
) -> list[dict[str, Any]]:
    """One part's groups: regex-lr groups first (by regex index), then the default; '... plus' for LoRA+ ups."""
    buckets: dict[tuple[int | None, bool], list[nn.Parameter]] = {}
    for m in loras:
        reg = next((i for i, (pattern, _) in enumerate(reg_lrs) if re.search(pattern, m.lora_name)), None)
        for pname, p in m.named_parameters():
            buckets.setdefault((reg, ratio is not None and pname.startswith("lora_up")), []).append(p)
    groups = []
    for reg, plus in sorted(buckets, key=lambda k: (k[0] is None, k[0] or 0, k[1])):
        base = lr if reg is None else reg_lrs[reg][1]
        group_lr = base * ratio if plus and base is not None and ratio is not None else base
        if group_lr:
            name = desc + ("" if reg is None else f" reg_lr_{reg}") + (" plus" if plus else "")
            groups.append({"params": buckets[(reg, plus)], "lr": group_lr, "description": name})
    return groups
