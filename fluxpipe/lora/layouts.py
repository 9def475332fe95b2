"""LoRA files in the layouts users have, converted on load to fluxpipe's own (kohya / ComfyUI) layout.

Layouts, decided by classifying every key of the file (one unknown key refuses the file, listing a few):

* ``kohya``: ``lora_unet_<path>.{lora_down.weight,lora_up.weight,alpha}`` (+ ``lora_te1_`` CLIP-L, ``lora_te3_`` T5);
* ``diffusers``: PEFT keys with diffusers' module names, ``transformer.<name>.lora_{A,B}.weight`` (+ ``text_encoder.``
  CLIP-L, ``text_encoder_2.`` T5), the scale from ``.alpha`` keys or the ``lora_adapter_metadata`` PEFT config;
* ``ai-toolkit``: the same diffusers names under ``diffusion_model.`` (or with no prefix);
* ``bfl``: BFL module paths with PEFT suffixes, ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``.

The diffusers names map onto FLUX.1's fused layers (facts as in diffusers' FLUX converters): q, k, v (and the
single block's MLP input) are row slices of ``qkv`` / ``linear1``; their LoRAs become one LoRA on the fused layer
with the downs stacked and a block-diagonal up (each part's scale folded into its block, alpha = the summed rank),
which is exactly the sum of the per-slice deltas. diffusers' ``norm_out`` stores (scale, shift), BFL's final
``adaLN_modulation`` (shift, scale): the up's halves are swapped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import torch
from torch import Tensor

from fluxpipe.errors import CheckpointError, summarize
from fluxpipe.io.checkpoints import COMFY_PREFIX, KIND_TEXT, detect_kind
from fluxpipe.lora.files import lora_pair_tensors

KOHYA_KEY = re.compile(  # (+ LyCORIS's LoKr / LoHa / full / DoRA tensors under the same module names)
    r"^(lora_unet|lora_te1|lora_te3)_\w+\.(lora_down\.weight|lora_up\.weight|alpha|dora_scale|diff|diff_b|"
    r"lokr_w[12](_[ab])?|lokr_t2|hada_w[12]_[ab]|hada_t[12])$"
)
PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|alpha)$")
# diffusers module-name suffix -> (BFL module path inside a block, slice index, number of slices)
DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0, 3),
    "attn.to_k": ("img_attn.qkv", 1, 3),
    "attn.to_v": ("img_attn.qkv", 2, 3),
    "attn.add_q_proj": ("txt_attn.qkv", 0, 3),
    "attn.add_k_proj": ("txt_attn.qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn.qkv", 2, 3),
    "attn.to_out.0": ("img_attn.proj", 0, 1),
    "attn.to_add_out": ("txt_attn.proj", 0, 1),
    "ff.net.0.proj": ("img_mlp.0", 0, 1),
    "ff.net.2": ("img_mlp.2", 0, 1),
    "ff_context.net.0.proj": ("txt_mlp.0", 0, 1),
    "ff_context.net.2": ("txt_mlp.2", 0, 1),
    "norm1.linear": ("img_mod.lin", 0, 1),
    "norm1_context.linear": ("txt_mod.lin", 0, 1),
}
SINGLE = {
    "attn.to_q": ("linear1", 0, 4),
    "attn.to_k": ("linear1", 1, 4),
    "attn.to_v": ("linear1", 2, 4),
    "proj_mlp": ("linear1", 3, 4),
    "proj_out": ("linear2", 0, 1),
    "norm.linear": ("modulation.lin", 0, 1),
}
GLOBAL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}
BFL_MODULE = re.compile(
    r"^(double_blocks\.\d+\.(img|txt)_(attn\.qkv|attn\.proj|mlp\.0|mlp\.2|mod\.lin)"
    r"|single_blocks\.\d+\.(linear1|linear2|modulation\.lin)|img_in|txt_in"
    r"|(time_in|vector_in|guidance_in)\.(in_layer|out_layer)|final_layer\.linear"
    r"|final_layer\.adaLN_modulation\.1)$"
)
TE_PREFIXES = {"text_encoder.": "lora_te1_", "text_encoder_2.": "lora_te3_"}  # diffusers' FluxPipeline names
SWAPPED = "final_layer.adaLN_modulation.1"


def diffusers_target(name: str) -> tuple[str, int, int] | None:
    """A diffusers FLUX module name -> (BFL module path, slice index, number of slices), or None."""
    if name in GLOBAL:
        return GLOBAL[name], 0, 1
    for head, table, bfl in (
        ("transformer_blocks", DOUBLE, "double_blocks"),
        ("single_transformer_blocks", SINGLE, "single_blocks"),
    ):
        m = re.match(rf"^{head}\.(\d+)\.(.+)$", name)
        if m and m.group(2) in table:
            path, index, count = table[m.group(2)]
            return f"{bfl}.{m.group(1)}.{path}", index, count
    return None


def _peft_module(module: str) -> tuple[str, str] | None:
    """A PEFT-suffixed key's module -> (layout, target) with target a kohya name (text encoders) or a BFL path."""
    for prefix, kohya in TE_PREFIXES.items():
        if module.startswith(prefix):
            return "diffusers", kohya + module[len(prefix) :].replace(".", "_")
    for prefix, layout in (("transformer.", "diffusers"), ("diffusion_model.", None), ("", None)):
        if not module.startswith(prefix):
            continue
        rest = module[len(prefix) :]
        if diffusers_target(rest) is not None:
            return layout or "ai-toolkit", rest
        if BFL_MODULE.match(rest) and prefix != "transformer.":
            return "bfl", rest
    return None


def classify(keys: list[str]) -> str:
    """The layout of a LoRA file from all its keys; raises CheckpointError naming unknown or mixed keys."""
    layouts: dict[str, list[str]] = {}
    unknown = []
    for key in keys:
        m = PEFT_KEY.match(key)
        hit = "kohya" if KOHYA_KEY.match(key) else (_peft_module(m.group("module")) or (None,))[0] if m else None
        if hit is None:
            unknown.append(key)
        else:
            layouts.setdefault(hit, []).append(key)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} of {len(keys)} keys are in no LoRA layout fluxpipe reads (kohya, "
            f"diffusers/PEFT, ai-toolkit, BFL): {summarize(unknown, 5)}"
        )
    if len(layouts) > 1:
        mixed = "; ".join(f"{k}: {v[0]}" for k, v in sorted(layouts.items()))
        raise CheckpointError(f"the keys mix LoRA layouts ({mixed}); convert the file to one layout")
    if not layouts:
        raise CheckpointError("the file holds no tensors")
    return next(iter(layouts))


def _adapter_config(metadata: Mapping[str, str]) -> dict:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"its lora_adapter_metadata is not JSON ({e}); remove or fix it") from e


def peft_scale(module: str, rank: int, alpha: Tensor | None, config: Mapping[str, object]) -> float:
    """alpha / rank from an ``.alpha`` key, else PEFT's lora_alpha (alpha_pattern first; rsLoRA: / sqrt(rank)),
    else 1 (diffusers' rule for a file without alphas)."""
    if alpha is not None:
        return float(alpha) / rank
    part = module.split(".", 1)[0]
    lora_alpha = config.get(f"{part}.lora_alpha")
    if lora_alpha is None:
        return 1.0
    patterns = config.get(f"{part}.alpha_pattern") or {}
    if not isinstance(patterns, Mapping):
        raise CheckpointError(f"{part}.alpha_pattern: {patterns!r} is not a mapping of module patterns to alphas")
    for pattern, value in patterns.items():
        if module == pattern or module.endswith("." + pattern):
            lora_alpha = value
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, int | float):
        raise CheckpointError(f"{part}.lora_alpha of {module}: {lora_alpha!r} is not a number")
    rs = bool(config.get(f"{part}.use_rslora"))
    return float(lora_alpha) / (rank**0.5 if rs else rank)


def _peft_pairs(state: Mapping[str, Tensor], config: Mapping[str, object]) -> dict[str, tuple[Tensor, Tensor, float]]:
    """module -> (down, up, scale) of a PEFT-suffixed state dict."""
    parts: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        m = PEFT_KEY.match(key)
        if m is None:
            raise CheckpointError(f"{key}: not a PEFT LoRA key (<module>.lora_A/lora_B.weight or .alpha)")
        parts.setdefault(m.group("module"), {})[m.group("part")] = tensor
    out = {}
    for module, p in parts.items():
        down, up = lora_pair_tensors(module, p, "lora_A", "lora_B")
        out[module] = (down, up, peft_scale(module, down.shape[0], p.get("alpha"), config))
    return out


def _kohya_module(target: str, down: Tensor, up: Tensor, alpha: float) -> dict[str, Tensor]:
    name = target if target.startswith("lora_") else "lora_unet_" + target.replace(".", "_")
    return {
        f"{name}.lora_down.weight": down,
        f"{name}.lora_up.weight": up,
        f"{name}.alpha": torch.tensor(alpha, dtype=torch.float32),
    }


def _fuse(path: str, count: int, slices: dict[int, tuple[Tensor, Tensor, float]]) -> dict[str, Tensor]:
    """Row-slice LoRAs of one fused layer -> one LoRA: downs stacked, block-diagonal up (scales folded in), alpha =
    rank (scale 1). A slice without a LoRA gets a zero block: q/k/v rows are the hidden size (the layer's input
    width), the single block's MLP rows 4x it (FLUX.1's mlp_ratio)."""
    hidden = next(iter(slices.values()))[0].shape[1]
    rows = [hidden] * 3 + ([4 * hidden] if count == 4 else [])
    for i, (_, up, _) in slices.items():
        rows[i] = up.shape[0]
    rank = sum(d.shape[0] for d, _, _ in slices.values())
    ref = next(iter(slices.values()))[1]
    down = torch.cat([slices[i][0].float() for i in sorted(slices)])
    up = torch.zeros(sum(rows), rank, dtype=torch.float32, device=ref.device)
    col = 0
    for i in sorted(slices):
        d, u, scale = slices[i]
        start = sum(rows[:i])
        up[start : start + u.shape[0], col : col + d.shape[0]] = u.float() * scale
        col += d.shape[0]
    return _kohya_module(path, down.to(ref.dtype), up.to(ref.dtype), float(rank))


def peft_to_kohya(state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> dict[str, Tensor]:
    """A diffusers / ai-toolkit / BFL-keyed LoRA in fluxpipe's kohya layout (same deltas)."""
    out: dict[str, Tensor] = {}
    fused: dict[tuple[str, int], dict[int, tuple[Tensor, Tensor, float]]] = {}
    for module, (down, up, scale) in _peft_pairs(state, _adapter_config(metadata)).items():
        found = _peft_module(module)
        if found is None:  # classify() has refused such files before
            raise CheckpointError(f"{module}: not a FLUX.1 or text-encoder module this LoRA layout names")
        _, target = found
        if target.startswith("lora_te"):
            out.update(_kohya_module(target, down, up, scale * down.shape[0]))
            continue
        path, index, count = diffusers_target(target) or (target, 0, 1)
        if count > 1:
            fused.setdefault((path, count), {})[index] = (down, up, scale)
            continue
        if path == SWAPPED and target != path:  # diffusers (scale, shift) -> BFL (shift, scale)
            up = torch.cat(up.chunk(2, dim=0)[::-1])
        out.update(_kohya_module(path, down, up, scale * down.shape[0]))
    for (path, count), slices in fused.items():
        out.update(_fuse(path, count, slices))
    return out


def _not_a_lora(keys: list[str]) -> str | None:
    """What a file without LoRA keys is (a DiT, an AE, ...), or None when it has LoRA keys."""
    if any(KOHYA_KEY.match(k) or PEFT_KEY.match(k) for k in keys):
        return None
    kind = detect_kind({k.removeprefix(COMFY_PREFIX) for k in keys})
    return KIND_TEXT.get(kind, KIND_TEXT["unknown"])


def to_kohya(state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> tuple[str, dict[str, Tensor]]:
    """(layout, the LoRA in fluxpipe's kohya layout); raises CheckpointError for a non-LoRA or unknown keys."""
    keys = list(state)
    what = _not_a_lora(keys)
    if what is not None:
        raise CheckpointError(f"is {what}, not a LoRA (no lora_down/lora_up/lora_A/lora_B keys)")
    layout = classify(keys)
    return layout, dict(state) if layout == "kohya" else peft_to_kohya(state, metadata)


def count_modules(kohya: Mapping[str, Tensor]) -> tuple[int, int]:
    """(modules, of which text-encoder modules) of a kohya-layout state dict."""
    names = {k.partition(".")[0] for k in kohya}
    return len(names), sum(n.startswith(("lora_te1", "lora_te3")) for n in names)
