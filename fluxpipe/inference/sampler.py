"""Images from prompts with the official FLUX.1 sampler, used by `fluxpipe sample`, by the trainer's samples and
by the evaluate stage.

Prompts are encoded first (CLIP-L and T5-XXL loaded, every distinct text encoded once, the encoders freed), so
the DiT and the AE never share the device with the text encoders. Generation follows the official code: noise
from ``fluxpipe.maths.sampling.get_noise`` (CPU generator, any device gives the same image), packing, the shifted
schedule (unshifted for schnell), Euler ``denoise`` (guidance embedding for dev, optional true CFG with a
negative prompt), unpacking, AE decoding, and the official conversion to 8-bit pixels.

A prompt's Kontext ``reference_image`` is resized (Lanczos) to the Kontext resolution nearest its aspect ratio, as
the official code does (``reference_size="target"``: to the sample's size instead), encoded by the AE and joined
to the image sequence with ids (1, row, col) (``fluxpipe.maths.kontext``). The latent is the AE posterior's mean (the
official code draws a posterior sample with the global RNG; its spread is tiny) scaled and shifted like a target's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from fluxpipe.io.progress import progress
from fluxpipe.data.images import load_rgb, to_tensor
from fluxpipe.data.prompts import SamplePrompt
from fluxpipe.data.text_encoding import encode_prompts
from fluxpipe.errors import CheckpointError, FluxpipeError
from fluxpipe.io.checkpoints import dit_slot, load_ae, load_model
from fluxpipe.io.safetensors_file import read_header, read_tensors
from fluxpipe.lora.files import apply_lora
from fluxpipe.lora.layouts import count_modules, to_kohya
from fluxpipe.maths.kontext import kontext_resolution, reference_tokens
from fluxpipe.maths.packing import image_ids, pack_latents, text_ids, unpack_latents
from fluxpipe.maths.sampling import denoise, get_noise, get_schedule
from fluxpipe.memory.block_swap import BlockSwapper
from fluxpipe.models.autoencoder import AutoEncoder
from fluxpipe.models.controlnet import ControlledFlux, ControlNetFlux, load_controlnet_state
from fluxpipe.models.flux import Flux
from fluxpipe.models.text_encoders import embedding_rows, load_clip_tokenizer, load_t5_tokenizer
from fluxpipe.models.chroma import is_chroma

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelFiles:
    flux: Path
    ae: Path
    clip_l: Path | None  # None: no CLIP-L (Chroma)
    t5xxl: Path
    clip_tokenizer: Path | None = None
    t5_tokenizer: Path | None = None


@dataclass(frozen=True, slots=True)
class Conditioning:
    """One prompt's encoder outputs (kept on the CPU until used)."""

    txt: Tensor  # [1, L, ctx] T5 hidden states
    vec: Tensor  # [1, vec] CLIP-L pooled
    mask: Tensor  # [1, L] T5 attention mask (1 = real token)


def split_lora(state: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """A kohya LoRA's tensors by the model they adapt: lora_unet / lora_te1 / lora_te3."""
    parts: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        parts.setdefault("_".join(key.split("_", 2)[:2]), {})[key] = tensor
    return parts


def load_lora(path: Path) -> tuple[str, dict[str, Tensor]]:
    """(layout, the LoRA in the kohya layout) of a LoRA file in any layout ``fluxpipe.lora.layouts`` reads."""
    header = read_header(path)
    try:
        return to_kohya(read_tensors(path, {k: k for k in header.tensors}), header.metadata)
    except CheckpointError as e:
        raise CheckpointError(f"{path} (--lora): {e}") from None


def lora_line(path: Path, layout: str, kohya: dict[str, Tensor]) -> str:
    """'<file>: <layout>, N modules patched (M text-encoder)'."""
    n, te = count_modules(kohya)
    return f"{path}: {layout}, {n} modules patched ({te} text-encoder)"


def read_loras(loras: list[tuple[Path, float]]) -> list[tuple[dict[str, dict[str, Tensor]], float]]:
    return [(split_lora(load_lora(path)[1]), mult) for path, mult in loras]


@torch.no_grad()
def encode_texts(
    files: ModelFiles,
    texts: list[str],
    *,
    device: str,
    dtype: torch.dtype,
    max_length: int,
    apply_t5_attn_mask: bool,
    loras: Sequence[tuple[dict, float]] = (),
    batch_size: int = 8,
) -> dict[str, Conditioning]:
    """Every distinct text encoded once; the encoders (with their LoRA parts merged) are freed afterwards."""
    clip = load_model(files.clip_l, "clip_l", dtype=dtype, device=device) if files.clip_l is not None else None
    t5 = load_model(files.t5xxl, "t5xxl", dtype=dtype, device=device)
    for parts, mult in loras:
        if "lora_te1" in parts and clip is not None:
            apply_lora(nn.Identity(), parts["lora_te1"], mult, clip_l=clip)
        if "lora_te3" in parts:
            apply_lora(nn.Identity(), parts["lora_te3"], mult, t5xxl=t5)
    clip_tok = load_clip_tokenizer(files.clip_tokenizer, rows=embedding_rows(clip)) if clip is not None else None
    t5_tok = load_t5_tokenizer(files.t5_tokenizer, max_length, rows=embedding_rows(t5))
    unique = list(dict.fromkeys(texts))
    out: dict[str, Conditioning] = {}
    for i in range(0, len(unique), batch_size):
        chunk = unique[i : i + batch_size]
        emb = encode_prompts(clip, t5, clip_tok, t5_tok, chunk, max_length, apply_t5_attn_mask)
        for j, text in enumerate(chunk):
            out[text] = Conditioning(emb.t5[j : j + 1].cpu(), emb.pooled[j : j + 1].cpu(), emb.mask[j : j + 1].cpu())
    del clip, t5
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def to_pil(pixels: Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> 8-bit RGB, as the official code converts (clamp, 127.5·(x + 1), truncate)."""
    x = pixels.float().clamp(-1, 1).permute(1, 2, 0)
    return Image.fromarray((127.5 * (x + 1.0)).cpu().byte().numpy())


class Sampler:
    """The DiT and the AE on one device, generating one image per call."""

    def __init__(
        self,
        dit: Flux,
        ae: AutoEncoder,
        *,
        device: str,
        dtype: torch.dtype,
        apply_t5_attn_mask: bool = False,
        controlnet: ControlNetFlux | None = None,
        reference_size: str = "kontext",
    ) -> None:
        self.dit, self.ae, self.device, self.dtype = dit, ae, device, dtype
        self.reference_size = reference_size  # Kontext: "kontext" (official resize) or "target" (the sample's)
        self.controlnet = controlnet  # a ControlNet-Flux for prompts with a control image (--cn)
        # Chroma: always the T5 mask, the shifted schedule, guidance 0 (real CFG comes from a negative prompt)
        self.chroma = is_chroma(dit)
        self.apply_t5_attn_mask = apply_t5_attn_mask or self.chroma
        self.shift = self.chroma or bool(dit.params.guidance_embed)  # official: shifted for dev, not for schnell

    def _cond(self, c: Conditioning) -> tuple[Tensor, Tensor, Tensor | None]:
        mask = c.mask.to(self.device) if self.apply_t5_attn_mask else None
        return c.txt.to(self.device, self.dtype), c.vec.to(self.device, self.dtype), mask

    @torch.no_grad()
    def latents(self, p: SamplePrompt, cond: Conditioning, negative: Conditioning | None, seed: int) -> Tensor:
        """The denoised latent [1, 16, 2⌈H/16⌉, 2⌈W/16⌉] of one prompt."""
        noise = get_noise(1, p.height, p.width, seed, self.device, self.dtype)
        lh, lw = noise.shape[2:]
        img = pack_latents(noise)
        txt, vec, mask = self._cond(cond)
        timesteps = get_schedule(p.steps, img.shape[1], shift=self.shift)
        neg = self._cond(negative) if negative is not None and p.cfg_scale != 1.0 else None
        model = self._model(p, lh, lw)
        was_training = self.dit.training
        self.dit.eval()
        reference = self.reference(p)
        bar = progress(total=len(timesteps) - 1, desc=f"sample {p.width}x{p.height}", unit="step", leave=False)
        try:
            x = denoise(
                model,
                img,
                image_ids(1, lh, lw, self.device, self.dtype),
                txt,
                text_ids(1, txt.shape[1], self.device, self.dtype),
                vec,
                timesteps,
                0.0 if self.chroma else p.guidance,
                txt_mask=mask,
                negative=neg,
                cfg_scale=p.cfg_scale,
                reference=reference,
                on_step=bar.update,
            )
        finally:
            bar.close()
            self.dit.train(was_training)
        return unpack_latents(x.float(), lh, lw)

    def reference(self, p: SamplePrompt) -> tuple[Tensor, Tensor] | None:
        """(tokens, ids) of the prompt's Kontext reference image, or None without one."""
        if p.reference_image is None:
            return None
        if not Path(p.reference_image).is_file():
            raise FluxpipeError(f"{p.reference_image}: no such reference image (prompt {p.index}, --reference-image)")
        image = load_rgb(Path(p.reference_image))
        size = (p.width, p.height) if self.reference_size == "target" else kontext_resolution(*image.size)
        return reference_tokens(encode_reference(self.ae, image, size, self.device).to(self.dtype))

    def _model(self, p: SamplePrompt, lh: int, lw: int) -> nn.Module:
        """The DiT, or with a control image the DiT steered by the ControlNet (the image resized to the
        sample's pixel grid, 8 x the latent size)."""
        if p.control_image is None:
            return self.dit
        if self.controlnet is None:
            raise FluxpipeError(
                f"prompt {p.index} has a control image (--cn {p.control_image}) but no ControlNet "
                "was given (--controlnet FILE)"
            )
        if not Path(p.control_image).is_file():
            raise FluxpipeError(f"{p.control_image}: no such control image (prompt {p.index}, --cn)")
        image = load_rgb(Path(p.control_image)).resize((lw * 8, lh * 8), Image.Resampling.LANCZOS)
        hint = to_tensor(image)[None].to(self.device, self.dtype)
        return ControlledFlux(self.dit, self.controlnet.eval(), hint)

    @torch.no_grad()
    def image(self, p: SamplePrompt, cond: Conditioning, negative: Conditioning | None, seed: int) -> Image.Image:
        z = self.latents(p, cond, negative, seed)
        ae_dtype = next(self.ae.parameters()).dtype
        return to_pil(self.ae.decode(z.to(ae_dtype))[0])


@torch.no_grad()
def encode_reference(ae: AutoEncoder, image: Image.Image, size: tuple[int, int], device: str) -> Tensor:
    """The Kontext reference latent [1, 16, H/8, W/8] of ``image`` resized (Lanczos) to ``size`` (W, H):
    scale · (posterior mean − shift), in float32."""
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    x = to_tensor(image)[None].to(device, next(ae.parameters()).dtype)
    return ae.encode(x, sample=False).float()


def load_sampler(
    files: ModelFiles,
    *,
    device: str,
    dtype: torch.dtype,
    loras: Sequence[tuple[dict, float]] = (),
    merge: bool = True,
    blocks_to_swap: int = 0,
    apply_t5_attn_mask: bool = False,
    compile_blocks: bool = False,
    controlnet: Path | None = None,
    reference_size: str = "kontext",
    model_type: str = "flux",
) -> Sampler:
    """DiT (LoRAs merged or attached, optionally block-swapped, resident blocks optionally compiled as in
    training's --torch_compile) and AE on ``device``; ``model_type`` chroma loads a Chroma DiT."""
    swap = blocks_to_swap and device.startswith("cuda")
    # (a Chroma DiT takes the same forward arguments; its ``params`` serve the ControlNet check below)
    dit = cast(Flux, load_model(files.flux, dit_slot(model_type), dtype=dtype, device="cpu" if swap else device))
    for parts, mult in loras:
        if "lora_unet" in parts:
            apply_lora(dit, parts["lora_unet"], mult, merge=merge)
    if swap:
        dit.block_swapper = BlockSwapper(dit, blocks_to_swap, device)
        dit.block_swapper.place(dit)
    if compile_blocks:
        compile_resident_blocks(dit)
    ae = load_ae(files.ae, dtype=torch.float32 if device == "cpu" else dtype, device=device)
    net = None
    if controlnet is not None:
        net = ControlNetFlux(dit.params)
        load_controlnet_state(net, read_tensors(controlnet, {k: k for k in read_header(controlnet).tensors}))
        net = net.to(device, dtype).requires_grad_(False)
    return Sampler(
        dit,
        ae,
        device=device,
        dtype=dtype,
        apply_t5_attn_mask=apply_t5_attn_mask,
        controlnet=net,
        reference_size=reference_size,
    )


def compile_resident_blocks(dit: Flux, backend: str = "inductor") -> int:
    """torch.compile each block that is not streamed by a block swapper (regional compilation: the blocks of a
    kind share one compiled graph); returns how many."""
    swapper = dit.block_swapper
    count = 0
    for kind in ("double", "single"):
        for i, block in enumerate(getattr(dit, f"{kind}_blocks")):
            if swapper is None or (kind, i) not in swapper.blocks:
                block.compile(backend=backend)
                count += 1
    return count


def default_steps(variant: str) -> int:
    """The official defaults: 50 steps for dev, 4 for schnell."""
    return 4 if variant == "schnell" else 50
