"""LoRA files in the kohya / ComfyUI layout: ``<prefix>_<module path with . -> _>.{lora_down.weight,
lora_up.weight,alpha}`` with prefixes ``lora_unet`` (DiT), ``lora_te1`` (CLIP-L), ``lora_te3`` (T5-XXL).

``apply_lora`` merges such a file into models: W += multiplier * (alpha / rank) * up @ down (spec §5.1,
§5.3). Every LoRA module must find its target; an unmatched name is an error, never skipped.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save
from torch import Tensor, nn

from fluxpipe.errors import CheckpointError, summarize
from fluxpipe.lora.lycoris import LYCORIS_SUFFIXES, ModuleDelta, attach_delta, merge_delta, module_delta

# module-path prefix of each LoRA prefix inside the model it targets (transformers 5's CLIPTextModel
# has no `text_model.` level, but the file names keep it, as the reference and ComfyUI write them)
LORA_PREFIXES = {"lora_unet": "lora_unet_", "lora_te1": "lora_te1_text_model_", "lora_te3": "lora_te3_"}


@dataclass(frozen=True)
class LoraPair:
    down: Tensor  # [rank, in]
    up: Tensor  # [out, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> Tensor:
        """alpha/rank * up @ down in float32, [out, in]."""
        return (self.up.float() @ self.down.float()) * self.scale


def parse_lora(state_dict: Mapping[str, Tensor]) -> dict[str, LoraPair | ModuleDelta]:
    """Group a kohya-layout state dict by module name; alpha defaults to the rank when absent or 0. Modules with
    LyCORIS tensors (LoKr, LoHa, full, DoRA's dora_scale) become their weight delta (fluxpipe.lora.lycoris)."""
    parts: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state_dict.items():
        name, _, suffix = key.partition(".")
        if suffix not in ("lora_down.weight", "lora_up.weight", "alpha") and suffix not in LYCORIS_SUFFIXES:
            raise CheckpointError(
                f"LoRA key {key!r} is not in the kohya/ComfyUI layout (expected <name>.lora_down.weight, "
                ".lora_up.weight, .alpha); convert the file to that layout first"
            )
        parts.setdefault(name, {})[suffix] = tensor
    pairs: dict[str, LoraPair | ModuleDelta] = {}
    for name, p in parts.items():
        if LYCORIS_SUFFIXES.intersection(p):
            pairs[name] = module_delta(name, p)
            continue
        down, up = lora_pair_tensors(name, p, "lora_down", "lora_up")
        alpha = float(p["alpha"]) if "alpha" in p else 0.0
        pairs[name] = LoraPair(down=down, up=up, alpha=alpha or float(down.shape[0]))
    return pairs


def lora_targets(model: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    """LoRA module name -> the nn.Linear it adapts, for every Linear in ``model``."""
    head = LORA_PREFIXES[prefix]
    return {head + name.replace(".", "_"): m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def merge_pair(linear: nn.Linear, pair: LoraPair, multiplier: float) -> None:
    """In-place W += multiplier * delta (float32 maths, stored back in the weight's dtype)."""
    if tuple(linear.weight.shape) != (pair.up.shape[0], pair.down.shape[1]):
        raise CheckpointError(
            f"LoRA shape {tuple(pair.up.shape[:1]) + tuple(pair.down.shape[1:])} does not fit weight "
            f"{tuple(linear.weight.shape)}: the LoRA was made for another model"
        )
    w = linear.weight
    delta = pair.delta().to(w.device)
    linear.weight.data = (w.float() + multiplier * delta).to(w.dtype)


def apply_lora(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    multiplier: float = 1.0,
    *,
    clip_l: nn.Module | None = None,
    t5xxl: nn.Module | None = None,
    merge: bool = True,
) -> int:
    """Merge a kohya-layout LoRA into the DiT ``model`` (and the text encoders when given); with
    ``merge=False`` the LoRA is attached as a separate branch instead (weights untouched, e.g. fp8 storage).

    Returns the number of merged modules. Raises CheckpointError if any LoRA module matches no layer,
    or if the file holds text-encoder modules and that encoder was not passed.
    """
    models = {"lora_unet": model, "lora_te1": clip_l, "lora_te3": t5xxl}
    pairs = parse_lora(state_dict)
    targets: dict[str, nn.Linear] = {}
    for prefix, m in models.items():
        if m is not None:
            targets.update(lora_targets(m, prefix))
    unmatched = [n for n in pairs if n not in targets]
    if unmatched:
        missing_te = {
            p for p in ("lora_te1", "lora_te3") if models[p] is None and any(n.startswith(p) for n in unmatched)
        }
        hint = f"; pass the text encoder(s) for {sorted(missing_te)}" if missing_te else ""
        raise CheckpointError(f"{len(unmatched)} LoRA modules match no layer: {summarize(unmatched)}{hint}")
    for name, pair in pairs.items():
        if isinstance(pair, ModuleDelta):
            (merge_delta if merge else attach_delta)(targets[name], pair, multiplier)
        else:
            (merge_pair if merge else attach_pair)(targets[name], pair, multiplier)
    return len(pairs)


def attach_pair(linear: nn.Linear, pair: LoraPair, multiplier: float) -> None:
    """Unmerged LoRA: the Linear's forward becomes forward(x) + multiplier·scale·up(down(x)); several LoRAs
    attached to one Linear add up."""
    if tuple(linear.weight.shape) != (pair.up.shape[0], pair.down.shape[1]):
        raise CheckpointError(
            f"LoRA shape {(pair.up.shape[0], pair.down.shape[1])} does not fit weight "
            f"{tuple(linear.weight.shape)}: the LoRA was made for another model"
        )
    down, up = pair.down.to(linear.weight.device), pair.up.to(linear.weight.device)
    previous, factor = linear.forward, multiplier * pair.scale
    if "_lora_base_forward" not in linear.__dict__:  # what detach_loras restores
        linear.__dict__["_lora_base_forward"] = linear.__dict__.get("forward")

    def forward(x: Tensor) -> Tensor:
        return previous(x) + factor * nn.functional.linear(nn.functional.linear(x, down.to(x.dtype)), up.to(x.dtype))

    linear.__dict__["forward"] = forward  # an instance attribute, as assigning linear.forward makes


def detach_loras(model: nn.Module) -> int:
    """Remove every LoRA branch ``attach_pair`` added to ``model``; returns how many Linears were restored."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and "_lora_base_forward" in m.__dict__:
            base = m.__dict__.pop("_lora_base_forward")
            if base is None:
                del m.forward
            else:
                m.__dict__["forward"] = base
            count += 1
    return count


def lora_pair_tensors(module: str, parts: dict[str, Tensor], down_name: str, up_name: str) -> tuple[Tensor, Tensor]:
    """(down, up) of one LoRA module from its ``<down_name>.weight`` / ``<up_name>.weight`` entries, checked to be
    matrices that chain (up @ down); one error naming the module otherwise."""
    if f"{down_name}.weight" not in parts or f"{up_name}.weight" not in parts:
        raise CheckpointError(f"LoRA module {module!r} lacks its {down_name} or {up_name} weight")
    down, up = parts[f"{down_name}.weight"], parts[f"{up_name}.weight"]
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise CheckpointError(
            f"LoRA module {module!r}: {up_name} {tuple(up.shape)} and {down_name} {tuple(down.shape)} do not chain"
        )
    return down, up


def addnet_hashes(tensors: dict[str, Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """The reference's sshs_model_hash / sshs_legacy_hash (spec §5.7): sha256 of the tensor-data section, and
    the first 8 hex digits of sha256 of the 64 KiB at 1 MiB, of a serialization carrying only ss_* metadata."""
    blob = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    (header,) = struct.unpack("<Q", blob[:8])
    return {
        "sshs_model_hash": hashlib.sha256(blob[8 + header :]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8],
    }


def save_lora(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """A trained LoRA file (kohya layout tensors), atomically, with the sshs_* hashes of its ss_* metadata."""
    from fluxpipe.io.safetensors_file import save_safetensors

    save_safetensors(tensors, path, {**metadata, **addnet_hashes(tensors, metadata)})
    return path


def load_lora_file(path: Path) -> dict[str, Tensor]:
    """A LoRA file to continue from (--network_weights): checked as safetensors first, never unpickled."""
    from fluxpipe.io.safetensors_file import read_header, read_tensors

    header = read_header(path)
    return read_tensors(path, {k: k for k in header.tensors})
