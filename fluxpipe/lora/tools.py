"""The maths of the `fluxpipe lora` tools, on kohya-layout LoRAs (``fluxpipe.lora.files.LoraPair`` per module).

* ``resize_pair``: SVD of up @ down to a lower rank, fixed or dynamic (the reference's resize_lora methods:
  ``sv_ratio`` keeps singular values above S[0] / param, ``sv_cumulative`` the smallest rank whose sum of singular
  values reaches param of the total, ``sv_fro`` the same for the Frobenius norm); alpha keeps the scale.
* ``svd_lora``: a LoRA of a weight difference (flux_extract_lora: up = U·S, down = Vh, clamped at a quantile).
* ``concat_pairs``: several LoRAs of one module as one, ranks concatenated (exact: its delta is the weighted sum).
* ``to_peft``: kohya names -> diffusers / ai-toolkit names (the tables of ``fluxpipe.lora.layouts``, inverted).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from fluxpipe.lora.files import LoraPair
from fluxpipe.lora.layouts import DOUBLE, GLOBAL, SINGLE

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


def dynamic_rank(s: Tensor, method: str, param: float) -> int:
    """Rank kept by a dynamic method from the singular values ``s`` (descending), at least 1."""
    s = s.double()
    if method == "sv_ratio":
        rank = int((s > s[0] / param).sum())
    elif method == "sv_cumulative":
        rank = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), torch.tensor(param, dtype=s.dtype))) + 1
    elif method == "sv_fro":
        sq = s.pow(2)
        rank = int(torch.searchsorted(torch.cumsum(sq, 0) / sq.sum(), torch.tensor(param**2, dtype=s.dtype))) + 1
    else:
        raise ValueError(f"unknown dynamic method {method!r}")
    return max(1, min(rank, len(s)))


def resize_pair(
    pair: LoraPair, new_rank: int, method: str | None = None, param: float | None = None, device: str = "cpu"
) -> LoraPair:
    """The pair at rank min(new_rank, dynamic rank, its rank): up = U·S, down = Vh of up @ down; alpha so that
    alpha / rank stays the pair's scale (the delta changes only by the dropped singular values)."""
    product = pair.up.to(device, torch.float32) @ pair.down.to(device, torch.float32)
    u, s, vh = torch.linalg.svd(product, full_matrices=False)
    rank = min(new_rank, pair.rank)
    if method is not None:
        if param is None:
            raise ValueError(f"the dynamic rank method {method} needs its parameter")
        rank = min(rank, dynamic_rank(s[: pair.rank], method, param))
    up = (u[:, :rank] * s[:rank]).cpu()
    return LoraPair(down=vh[:rank].contiguous().cpu(), up=up.contiguous(), alpha=pair.scale * rank)


def svd_lora(delta: Tensor, dim: int, clamp_quantile: float | None = 0.99) -> LoraPair:
    """A rank-``dim`` LoRA (alpha = dim, scale 1) of ``delta`` [out, in]; entries clamped at the ``clamp_quantile``
    of their absolute values (None or 1: no clamping)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    rank = min(dim, s.shape[0])
    up, down = u[:, :rank] * s[:rank], vh[:rank]
    if clamp_quantile is not None and clamp_quantile < 1:
        values = torch.cat([up.flatten(), down.flatten()]).abs()
        hi = torch.quantile(values[: 2**24], clamp_quantile)
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    return LoraPair(down=down.contiguous(), up=up.contiguous(), alpha=float(rank))


def concat_pairs(pairs: list[tuple[LoraPair, float]]) -> LoraPair:
    """One pair equal to Σ ratio·scale·up @ down: downs stacked, ups (scaled) side by side, alpha = rank."""
    down = torch.cat([p.down.float() for p, _ in pairs])
    up = torch.cat([p.up.float() * (p.scale * ratio) for p, ratio in pairs], dim=1)
    return LoraPair(down=down, up=up, alpha=float(down.shape[0]))


# kohya module name (after lora_unet_) -> BFL module path
_BLOCK_PARTS = {
    "img_attn_qkv": "img_attn.qkv",
    "img_attn_proj": "img_attn.proj",
    "img_mlp_0": "img_mlp.0",
    "img_mlp_2": "img_mlp.2",
    "img_mod_lin": "img_mod.lin",
    "linear1": "linear1",
    "linear2": "linear2",
    "modulation_lin": "modulation.lin",
}
_BLOCK_PARTS |= {k.replace("img", "txt"): v.replace("img", "txt") for k, v in _BLOCK_PARTS.items() if "img" in k}
_GLOBAL_PARTS = {v.replace(".", "_"): v for v in GLOBAL.values()}
_TE = [
    (
        re.compile(r"^lora_te1_text_model_encoder_layers_(\d+)_(self_attn_(q|k|v|out)_proj|mlp_fc[12])$"),
        "text_encoder.",
        lambda m: (
            f"text_model.encoder.layers.{m[1]}." + m[2].replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
        ),
    ),
    (
        re.compile(r"^lora_te3_encoder_block_(\d+)_layer_(\d+)_(SelfAttention_[qkvo]|DenseReluDense_(wi_0|wi_1|wo))$"),
        "text_encoder_2.",
        lambda m: f"encoder.block.{m[1]}.layer.{m[2]}." + m[3].replace("_", ".", 1),
    ),
]


def bfl_path(kohya_name: str) -> str | None:
    """'lora_unet_double_blocks_0_img_attn_qkv' -> 'double_blocks.0.img_attn.qkv' (None when unknown)."""
    rest = kohya_name.removeprefix("lora_unet_")
    m = re.match(r"^(double|single)_blocks_(\d+)_(.+)$", rest)
    if m and m[3] in _BLOCK_PARTS:
        return f"{m[1]}_blocks.{m[2]}.{_BLOCK_PARTS[m[3]]}"
    return _GLOBAL_PARTS.get(rest) if kohya_name.startswith("lora_unet_") else None


def _diffusers_names(path: str) -> list[tuple[str, int]]:
    """BFL path -> [(diffusers name, slice index)] in slice order."""
    for name, target in GLOBAL.items():
        if target == path:
            return [(name, 0)]
    kind, index, part = path.split(".", 2)
    table, head = (DOUBLE, "transformer_blocks") if kind == "double_blocks" else (SINGLE, "single_transformer_blocks")
    hits = sorted((i, f"{head}.{index}.{name}") for name, (p, i, _) in table.items() if p == part)
    return [(n, i) for i, n in hits]


def to_peft(pairs: dict[str, LoraPair], prefix: str) -> dict[str, Tensor]:
    """kohya pairs -> PEFT keys with diffusers names under ``prefix`` ('transformer.' / 'diffusion_model.'); scales
    folded into B; a fused layer's up split by rows (q, k, v thirds; linear1: hidden x3, then the MLP), its down
    shared; final adaLN halves swapped. Raises ValueError naming a module with no diffusers name."""
    out: dict[str, Tensor] = {}
    for name, pair in pairs.items():
        te = next(((p, f(m)) for rx, p, f in _TE if (m := rx.match(name))), None)
        if te is not None:
            out[f"{te[0]}{te[1]}.lora_A.weight"] = pair.down
            out[f"{te[0]}{te[1]}.lora_B.weight"] = pair.up * pair.scale
            continue
        path = bfl_path(name)
        if path is None:
            raise ValueError(f"LoRA module {name!r} has no diffusers name")
        up = pair.up.float() * pair.scale
        names = _diffusers_names(path)
        if path == "final_layer.adaLN_modulation.1":
            up = torch.cat(up.chunk(2, dim=0)[::-1])
        hidden = pair.down.shape[1]
        rows = (
            [up.shape[0]] if len(names) == 1 else [hidden] * 3 + ([up.shape[0] - 3 * hidden] if len(names) == 4 else [])
        )
        for (dname, _), part in zip(names, torch.split(up, rows), strict=True):
            out[f"{prefix}{dname}.lora_A.weight"] = pair.down.clone()  # a copy per split: no shared storage
            out[f"{prefix}{dname}.lora_B.weight"] = part.to(pair.up.dtype).contiguous()
    return out
