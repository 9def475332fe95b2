"""The one loader for FLUX.1 model files: DiT, autoencoder, CLIP-L, T5-XXL.

``inspect_checkpoint(path, slot)`` reads only the header, recognises what the file is, infers the
model's hyper-parameters from key shapes and compares every key and shape against a model built on
the meta device. ``load_model`` then fills that meta model with memory-mapped tensors through
``load_state_dict(strict=True, assign=True)``: no random initialisation, no silent partial load.
Handled: bf16/fp16/fp32 and float8_e4m3fn files, the ComfyUI ``model.diffusion_model.`` prefix,
the CLIP ``text_model.`` prefix, the tied T5 embedding. Refused with a reason: pickle formats,
Diffusers layouts, other fp8 variants, scaled fp8, the wrong model in a slot.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fluxpipe.errors import CheckpointError, summarize
from fluxpipe.io.hashing import FLOAT_CODES
from fluxpipe.io.safetensors_file import DTYPE_NAMES, Header, read_header, read_tensors
from fluxpipe.models import text_encoders as te
from fluxpipe.models.autoencoder import AutoEncoder, AutoEncoderParams, infer_ae_params
from fluxpipe.models.chroma import Chroma, ChromaParams, infer_chroma_params
from fluxpipe.models.flux import Flux, FluxParams, flux_size_class, flux_variant, infer_flux_params

if TYPE_CHECKING:  # transformers loads when a text encoder's config is made (models.text_encoders)
    from transformers import CLIPTextConfig, T5Config

SLOTS = ("flux", "ae", "clip_l", "t5xxl", "chroma")
DIT_SLOTS = {"flux": "flux", "kontext": "flux", "chroma": "chroma"}  # --model_type -> the DiT's slot
COMFY_PREFIX = "model.diffusion_model."
KIND_TEXT = {
    "flux": "a FLUX.1 DiT (flux1-dev/flux1-schnell.safetensors)",
    "chroma": "a Chroma DiT (Chroma1-Base.safetensors)",
    "ae": "a FLUX.1 autoencoder (ae.safetensors)",
    "clip_l": "a CLIP-L text encoder (clip_l.safetensors)",
    "t5xxl": "a T5-XXL text encoder (t5xxl_fp16.safetensors)",
    "controlnet": "a FLUX ControlNet",
    "lora": "a LoRA",
    "flux-diffusers": "a Diffusers-format FLUX transformer",
    "ae-diffusers": "a Diffusers-format autoencoder",
    "unknown": "not a model fluxpipe recognises",
}
SLOT_FLAG = {"flux": "--flux", "ae": "--ae", "clip_l": "--clip-l", "t5xxl": "--t5xxl", "chroma": "--flux"}
DIFFUSERS_FIX = (
    "Diffusers-format weights are not used: take the single top-level files of the release "
    "(flux1-dev.safetensors and ae.safetensors), not the transformer/ or vae/ subfolder"
)


@dataclass(frozen=True)
class ModelSpec:
    """What a checkpoint file is and how it maps onto a model (built by ``inspect_checkpoint``)."""

    slot: str
    params: FluxParams | ChromaParams | AutoEncoderParams | CLIPTextConfig | T5Config
    key_map: dict[str, str]  # file key -> model state-dict key
    ignored: tuple[str, ...]  # file keys deliberately unused (reported, never silent)
    build: Callable[[], nn.Module]
    header: Header

    @property
    def num_parameters(self) -> int:
        """Parameters stored in the file, the tied T5 embedding counted once."""
        keys = set(self.key_map.values())
        if self.slot == "t5xxl" and set(te.T5_TIED_KEYS) <= keys:
            keys.discard(te.T5_TIED_KEYS[1])
        return sum(self.header.tensors[k].numel for k, nk in self.key_map.items() if nk in keys)

    def dtypes(self) -> dict[str, int]:
        counts = Counter(
            DTYPE_NAMES.get(self.header.tensors[k].dtype, self.header.tensors[k].dtype) for k in self.key_map
        )
        return dict(sorted(counts.items()))

    def describe(self) -> dict[str, object]:
        """Variant and size facts for reports."""
        p = self.params
        if isinstance(p, ChromaParams):
            return {
                "variant": "chroma",
                "size": "full" if p.hidden_size == 3072 else "reduced",
                "depth": p.depth,
                "depth_single_blocks": p.depth_single_blocks,
                "hidden_size": p.hidden_size,
            }
        if isinstance(p, FluxParams):
            return {
                "variant": flux_variant(p),
                "size": flux_size_class(p),
                "depth": p.depth,
                "depth_single_blocks": p.depth_single_blocks,
                "hidden_size": p.hidden_size,
            }
        if isinstance(p, AutoEncoderParams):
            return {"ch": p.ch, "ch_mult": p.ch_mult, "z_channels": p.z_channels}
        from transformers import CLIPTextConfig  # loaded already: it made this config

        if isinstance(p, CLIPTextConfig):
            return {"hidden_size": p.hidden_size, "layers": p.num_hidden_layers}
        return {"d_model": p.d_model, "layers": p.num_layers, "heads": p.num_heads}

    @property
    def flux_params(self) -> FluxParams:
        if not isinstance(self.params, FluxParams):
            raise TypeError(f"{self.header.path} is {self.slot}, not a FLUX.1 DiT")
        return self.params

    @property
    def width(self) -> int:
        """The width the DiT must fit: CLIP-L's hidden size, T5's d_model, 4 x the AE's latent channels."""
        p = self.params
        if isinstance(p, FluxParams | ChromaParams):
            return p.hidden_size
        if isinstance(p, AutoEncoderParams):
            return p.z_channels * 4
        from transformers import CLIPTextConfig  # loaded already: it made this config

        return p.hidden_size if isinstance(p, CLIPTextConfig) else p.d_model

    @property
    def vocab_size(self) -> int:
        """A text encoder's embedding rows."""
        p = self.params
        if isinstance(p, FluxParams | ChromaParams | AutoEncoderParams):
            raise TypeError(f"{self.header.path} is {self.slot}, not a text encoder")
        return p.vocab_size


def detect_kind(keys: set[str]) -> str:
    """What a state dict holds, from its key names alone."""
    if any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in keys):
        return "flux-diffusers"
    if any(k.startswith("lora_") or ".lora_down." in k or ".lora_A." in k for k in keys):
        return "lora"
    if any(k.startswith("controlnet_blocks.") for k in keys):
        return "controlnet"
    if any(k.startswith("distilled_guidance_layer.") for k in keys):
        return "chroma"
    if any(k.startswith(("double_blocks.", "single_blocks.")) for k in keys):
        return "flux"
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys):
        return "ae-diffusers"
    if "encoder.conv_in.weight" in keys or "decoder.conv_in.weight" in keys:
        return "ae"
    if any(k.startswith(("text_model.", "embeddings.token_embedding")) for k in keys):
        return "clip_l"
    if any(k.startswith("encoder.block.") for k in keys) or "shared.weight" in keys:
        return "t5xxl"
    return "unknown"


def _check_dtypes(header: Header) -> None:
    bad = sorted({t.dtype for t in header.tensors.values() if t.dtype.startswith("F8_") and t.dtype != "F8_E4M3"})
    if bad:
        raise CheckpointError(
            f"{header.path}: fp8 format {', '.join(bad)} is not supported; only float8_e4m3fn "
            "files load (or use the fp16/bf16 file)"
        )
    if "scaled_fp8" in header.tensors or any(k.endswith(".scale_weight") for k in header.tensors):
        raise CheckpointError(
            f"{header.path}: 'scaled' fp8 files (per-tensor scale_weight) are not supported; use "
            "the plain float8_e4m3fn file (e.g. t5xxl_fp8_e4m3fn.safetensors) or the fp16 file"
        )


def _diffusers_folder(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in ("model_index.json", "transformer", "vae", "config.json"))


def _file_keys(header: Header, slot: str) -> dict[str, str]:
    """file key -> normalised key (ComfyUI DiT prefix and CLIP ``text_model.`` prefix removed)."""
    out = {}
    for k in header.tensors:
        nk = k[len(COMFY_PREFIX) :] if slot in ("flux", "chroma") and k.startswith(COMFY_PREFIX) else k
        if slot == "clip_l" and nk.startswith(te.CLIP_FILE_PREFIX):
            nk = nk[len(te.CLIP_FILE_PREFIX) :]
        out[k] = nk
    return out


def _params_and_builder(
    slot: str, header: Header
) -> tuple[FluxParams | ChromaParams | AutoEncoderParams | CLIPTextConfig | T5Config, Callable[[], nn.Module]]:
    shapes = {nk: header.tensors[k].shape for k, nk in _file_keys(header, slot).items()}
    if slot == "flux":
        params = infer_flux_params(shapes)
        if params.out_channels != 64 or params.in_channels not in (64, 384):
            raise ValueError(
                f"in/out channels {params.in_channels}/{params.out_channels} (FLUX.1 has 64/64, Fill 384/64)"
            )
        return params, lambda: Flux(params)
    if slot == "chroma":
        chroma = infer_chroma_params(shapes)
        if chroma.in_channels != 64 or chroma.out_channels != 64:
            raise ValueError(f"in/out channels {chroma.in_channels}/{chroma.out_channels} (Chroma has 64/64)")
        return chroma, lambda: Chroma(chroma)
    if slot == "ae":
        ae_params = infer_ae_params(shapes)
        return ae_params, lambda: AutoEncoder(ae_params)
    if slot == "clip_l":
        clip_cfg = te.clip_config_from_shapes({te.CLIP_FILE_PREFIX + k: v for k, v in shapes.items()})
        return clip_cfg, lambda: te.build_clip(clip_cfg)
    t5_cfg = te.t5_config_from_shapes(shapes)
    return t5_cfg, lambda: te.build_t5(t5_cfg)


def _ignorable(slot: str, file_key: str) -> bool:
    return slot == "clip_l" and file_key in te.CLIP_IGNORED_KEYS


def dit_slot(model_type: str) -> str:
    """The loader slot of the DiT for a --model_type: 'flux' (flux, kontext) or 'chroma'."""
    if model_type not in DIT_SLOTS:
        raise CheckpointError(f"--model_type {model_type}: unknown; use one of {', '.join(DIT_SLOTS)}")
    return DIT_SLOTS[model_type]


def inspect_checkpoint(path: str | Path, slot: str) -> ModelSpec:
    """Check ``path`` as the model for ``slot`` from its header alone; raise CheckpointError naming the fix."""
    path = Path(path)
    if _diffusers_folder(path):
        raise CheckpointError(f"{path}: is a Diffusers-format folder. {DIFFUSERS_FIX}")
    header = read_header(path)
    _check_dtypes(header)
    kind = detect_kind({k[len(COMFY_PREFIX) :] if k.startswith(COMFY_PREFIX) else k for k in header.tensors})
    if kind in ("flux-diffusers", "ae-diffusers"):
        raise CheckpointError(f"{path}: is {KIND_TEXT[kind]}. {DIFFUSERS_FIX}")
    if {kind, slot} == {"flux", "chroma"}:
        raise CheckpointError(
            f"{path}: is {KIND_TEXT[kind]}, but was loaded as {KIND_TEXT[slot]}; use --model_type {kind}"
        )
    if kind != slot:
        raise CheckpointError(
            f"{path}: is {KIND_TEXT[kind]}, but was given as {KIND_TEXT[slot]} "
            f"({SLOT_FLAG[slot]} / models.{slot}); put each file in its own slot"
        )
    try:
        params, build = _params_and_builder(slot, header)
    except (KeyError, ValueError, StopIteration) as e:
        raise CheckpointError(
            f"{path}: shapes match no FLUX.1 {slot} variant ({type(e).__name__}: {e}); "
            "is the file complete and the right model?"
        ) from e
    file_keys = _file_keys(header, slot)
    ignored = tuple(sorted(k for k in file_keys if _ignorable(slot, k)))
    key_map = {k: nk for k, nk in file_keys.items() if k not in ignored}
    spec = ModelSpec(slot=slot, params=params, key_map=key_map, ignored=ignored, build=build, header=header)
    _compare_with_model(spec)
    return spec


def _expected(spec: ModelSpec) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """The model's tensor shapes and the names of its floating-point tensors (built on the meta device)."""
    with torch.device("meta"):
        model = spec.build()
    state = model.state_dict()
    return {k: tuple(v.shape) for k, v in state.items()}, {k for k, v in state.items() if v.is_floating_point()}


def _compare_with_model(spec: ModelSpec) -> None:
    expected, float_slots = _expected(spec)
    found = {nk: spec.header.tensors[k].shape for k, nk in spec.key_map.items()}
    if spec.slot == "t5xxl":  # one tied tensor under either name (or both)
        for a, b in (te.T5_TIED_KEYS, te.T5_TIED_KEYS[::-1]):
            if a in found and b not in found:
                found[b] = found[a]
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} {found[k]} != {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
    not_float = [
        f"{fk} is {spec.header.tensors[fk].dtype}"
        for fk, k in spec.key_map.items()
        if k in float_slots and spec.header.tensors[fk].dtype not in FLOAT_CODES
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {summarize(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {summarize(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches: {summarize(wrong, 4)}")
    if not_float:
        problems.append(f"{len(not_float)} non-float tensors in float weights: {summarize(not_float, 4)}")
    if problems:
        raise CheckpointError(
            f"{spec.header.path}: does not load strictly as {KIND_TEXT[spec.slot]}: " + "; ".join(problems)
        )


_META_BUFFER_FIXERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # CLIP's non-persistent position ids (not in any file)
    "embeddings.position_ids": lambda b: torch.arange(b.shape[-1]).expand(b.shape).clone()
}


def _materialize_buffers(model: nn.Module) -> None:
    for name, buf in list(model.named_buffers()):
        if not buf.is_meta:
            continue
        if name not in _META_BUFFER_FIXERS:
            raise RuntimeError(f"buffer {name} left on the meta device after loading")
        owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        owner._buffers[name.rpartition(".")[2]] = _META_BUFFER_FIXERS[name](buf)


def load_flux(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Flux:
    """``load_model`` of a FLUX.1 DiT file."""
    model = load_model(path, "flux", dtype, device)
    assert isinstance(model, Flux)  # the flux slot builds a Flux
    return model


def load_ae(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> AutoEncoder:
    """``load_model`` of a FLUX.1 autoencoder file."""
    model = load_model(path, "ae", dtype, device)
    assert isinstance(model, AutoEncoder)  # the ae slot builds an AutoEncoder
    return model


LOUD_LOAD_BYTES = 256 * 2**20  # model files from this size on are announced when loaded


def load_model(
    path: str | Path, slot: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """Build ``slot``'s model on the meta device and fill it strictly from ``path``.

    dtype: cast floating tensors while reading (None keeps the stored dtype, e.g. fp8 storage).
    """
    spec = inspect_checkpoint(path, slot)
    size = Path(spec.header.path).stat().st_size
    if size >= LOUD_LOAD_BYTES:  # a long load says what it loads (on the terminal too)
        from fluxpipe.io.progress import announce

        announce(f"loading {slot} from {spec.header.path} ({size / 1e9:.1f} GB) to {device}")
    state = read_tensors(spec.header.path, spec.key_map, dtype)
    if spec.slot == "t5xxl":
        for a, b in (te.T5_TIED_KEYS, te.T5_TIED_KEYS[::-1]):
            if a in state and b not in state:
                state[b] = state[a]
    with torch.device("meta"):
        model = spec.build()
    model.load_state_dict(state, strict=True, assign=True)
    if spec.slot == "t5xxl":
        model.get_submodule("encoder").embed_tokens = model.get_submodule("shared")  # one tensor, as the original
    _materialize_buffers(model)
    model.requires_grad_(False)
    return model.to(device).eval()
