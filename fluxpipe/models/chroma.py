"""Chroma (lodestones' Chroma / Chroma1-Base): a FLUX.1-schnell-derived DiT whose modulations come from one MLP.

Definition followed: the reference trainer's ``library/chroma_models.py`` (itself lodestones' ``flow`` code,
``src/models/chroma/model.py``); the reference is not vendored here, so the semantics below are written down
precisely and tested against an independent float64 formula (tests/test_chroma_reference.py).

Differences from ``fluxpipe.models.flux.Flux`` (same ``img_in``, ``txt_in``, RoPE, block maths):

* no ``time_in`` / ``vector_in`` / ``guidance_in`` (no CLIP-L pooled vector; ``y`` is ignored), no
  ``img_mod`` / ``txt_mod`` / ``modulation`` linears in the blocks and no ``final_layer.adaLN_modulation``;
* ``distilled_guidance_layer`` (the "approximator") makes every modulation vector at once:
  ``in_proj`` (64 -> 5120), 5 residual layers ``x = x + layers[i](norms[i](x))`` (``MLPEmbedder``, RMSNorm with
  ``scale``), ``out_proj`` (5120 -> 3072). Its input is, for each of the 344 modulation indices j,
  ``[emb16(t) | emb16(guidance) | emb32(j)]`` with ``emb_d`` the FLUX sinusoidal embedding (argument x 1000,
  cos half first); the index j goes through the same embedding (1000·j);
* the 344 output vectors are laid out: single block i -> rows 3i..3i+2 (shift, scale, gate); double block i,
  image stream -> 3S + 6i .. +5 (attention shift/scale/gate, then MLP's), text stream -> 3S + 6D + 6i .. +5;
  the final layer -> the last two rows (shift, scale). (S = 38 single, D = 19 double blocks: 114 + 228 + 2 = 344.)
* the T5 attention mask is required; as the reference does, the first padding token after each caption is
  attended as well (``modify_mask_to_attend_padding(mask, L, 1)``). Fluxpipe applies it as a key mask (text
  keys masked, image keys always visible; queries unmasked), which for every image token and every real text
  token equals the reference's mask (an outer product m·mᵀ that also masks queries of padding tokens; those
  rows never reach the output). The reference's batched form sums that product over the batch (a union of the
  items' masks); fluxpipe keeps each item's own mask.
* guidance: Chroma is trained and sampled with guidance 0 (``--guidance_scale 0``) and real CFG.

File layout (strict): ``img_in.*``, ``txt_in.*``, ``distilled_guidance_layer.{in_proj,out_proj}.{weight,bias}``,
``distilled_guidance_layer.layers.{0..4}.{in_layer,out_layer}.{weight,bias}``,
``distilled_guidance_layer.norms.{0..4}.scale``, ``double_blocks.{0..18}.{img,txt}_{attn.qkv,attn.proj,
mlp.0,mlp.2}.{weight,bias}``, ``double_blocks.N.{img,txt}_attn.norm.{query,key}_norm.scale``,
``single_blocks.{0..37}.{linear1,linear2}.{weight,bias}``, ``single_blocks.N.norm.{query,key}_norm.scale``,
``final_layer.linear.{weight,bias}`` (optionally under ComfyUI's ``model.diffusion_model.`` prefix).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fluxpipe.models.layers import (
    DoubleStreamBlock,
    EmbedND,
    MLPEmbedder,
    RMSNorm,
    SingleStreamBlock,
    timestep_embedding,
)

ATTEND_PADDING = 1  # padding tokens after each caption that stay visible (the reference's attn_padding)


@dataclass
class ChromaParams:
    """Hyper-parameters of a Chroma DiT (the reference's ChromaParams field names)."""

    in_channels: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: list[int]
    theta: int
    qkv_bias: bool
    approximator_in_dim: int = 64
    approximator_depth: int = 5
    approximator_hidden_size: int = 5120
    out_channels: int | None = None  # None: same as in_channels

    def __post_init__(self) -> None:
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.hidden_size // self.num_heads:
            raise ValueError(f"sum(axes_dim)={sum(self.axes_dim)} must equal the head dim")
        if self.approximator_in_dim % 4:
            raise ValueError(f"approximator_in_dim {self.approximator_in_dim} must be a multiple of 4")

    @property
    def mod_index_length(self) -> int:
        """Number of modulation vectors: 3 per single block, 6 + 6 per double block, 2 for the final layer."""
        return 3 * self.depth_single_blocks + 12 * self.depth + 2


CHROMA = ChromaParams(
    in_channels=64,
    context_in_dim=4096,
    hidden_size=3072,
    mlp_ratio=4.0,
    num_heads=24,
    depth=19,
    depth_single_blocks=38,
    axes_dim=[16, 56, 56],
    theta=10_000,
    qkv_bias=True,
)


def tiny_chroma(*, context_in_dim: int = 32) -> ChromaParams:
    """A Chroma-shaped model for CPU tests and the demo (hidden 64, head dim 32, approximator 64 -> 96 -> 64)."""
    return replace(
        CHROMA,
        context_in_dim=context_in_dim,
        hidden_size=64,
        num_heads=2,
        depth=2,
        depth_single_blocks=2,
        axes_dim=[4, 14, 14],
        approximator_depth=2,
        approximator_hidden_size=96,
    )


class Approximator(nn.Module):
    """The modulation MLP: in_proj, residual RMSNorm -> MLPEmbedder layers, out_proj."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, n_layers: int = 5):
        super().__init__()
        self.in_proj = nn.Linear(in_dim, hidden_dim, bias=True)
        self.layers = nn.ModuleList(MLPEmbedder(hidden_dim, hidden_dim) for _ in range(n_layers))
        self.norms = nn.ModuleList(RMSNorm(hidden_dim) for _ in range(n_layers))
        self.out_proj = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.in_proj(x)
        for layer, norm in zip(self.layers, self.norms, strict=True):
            x = x + layer(norm(x))
        return self.out_proj(x)


class ChromaLastLayer(nn.Module):
    """FLUX's LastLayer without adaLN_modulation: (shift, scale) come from the approximator."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        """x [B, N, C], vec [B, 2, C] = (shift, scale)."""
        shift, scale = vec[:, 0:1], vec[:, 1:2]
        return self.linear((1 + scale) * self.norm_final(x) + shift)


def approximator_input(params: ChromaParams, timesteps: Tensor, guidance: Tensor) -> Tensor:
    """[B, 344, 64]: for every modulation index j, emb16(t) | emb16(guidance) | emb32(j)."""
    quarter = params.approximator_in_dim // 4
    t_g = torch.cat([timestep_embedding(timesteps, quarter), timestep_embedding(guidance, quarter)], dim=1)
    index = torch.arange(params.mod_index_length, device=timesteps.device)
    index_emb = timestep_embedding(index, 2 * quarter).to(t_g)
    n = params.mod_index_length
    return torch.cat([t_g[:, None, :].expand(-1, n, -1), index_emb[None].expand(t_g.shape[0], -1, -1)], dim=-1)


def block_modulations(mods: Tensor, params: ChromaParams, kind: str, i: int = 0) -> Tensor:
    """The rows of the approximator output [B, 344, C] that block ``i`` of ``kind`` reads:
    single [B, 3, C]; double [B, 12, C] (image stream's 6, then text stream's 6); final [B, 2, C]."""
    n_single, n_double = params.depth_single_blocks, params.depth
    if kind == "single":
        return mods[:, 3 * i : 3 * i + 3]
    if kind == "double":
        img = 3 * n_single + 6 * i
        txt = 3 * n_single + 6 * n_double + 6 * i
        return torch.cat([mods[:, img : img + 6], mods[:, txt : txt + 6]], dim=1)
    if kind == "final":
        return mods[:, -2:]
    raise ValueError(f"unknown block kind {kind!r}")


def chroma_key_mask(txt_mask: Tensor, n_img: int, attend_padding: int = ATTEND_PADDING) -> Tensor:
    """[B, L] T5 mask -> bool key mask [B, 1, 1, L + n_img]: the caption's tokens plus the first
    ``attend_padding`` padding tokens after it, and every image token."""
    lengths = txt_mask.bool().sum(dim=1, keepdim=True)
    pos = torch.arange(txt_mask.shape[1], device=txt_mask.device)[None]
    txt_ok = txt_mask.bool() | ((pos >= lengths) & (pos < lengths + attend_padding))
    img_ok = torch.ones(txt_mask.shape[0], n_img, dtype=torch.bool, device=txt_mask.device)
    return torch.cat((txt_ok, img_ok), dim=1)[:, None, None, :]


class Chroma(nn.Module):
    """Chroma DiT on packed latent sequences (img [B, N, 64] -> velocity [B, N, 64])."""

    def __init__(self, params: ChromaParams):
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels: int = params.out_channels or params.in_channels
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        pe_dim = params.hidden_size // params.num_heads
        self.pe_embedder = EmbedND(dim=pe_dim, theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = nn.Linear(self.in_channels, self.hidden_size, bias=True)
        self.txt_in = nn.Linear(params.context_in_dim, self.hidden_size)
        self.distilled_guidance_layer = Approximator(
            params.approximator_in_dim, self.hidden_size, params.approximator_hidden_size, params.approximator_depth
        )
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(self.hidden_size, self.num_heads, params.mlp_ratio, params.qkv_bias, modulation=False)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(self.hidden_size, self.num_heads, mlp_ratio=params.mlp_ratio, modulation=False)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = ChromaLastLayer(self.hidden_size, 1, self.out_channels)
        self.gradient_checkpointing = False
        self.cpu_offload_checkpointing = False  # not supported for Chroma (as in the reference)
        self.block_swapper = None  # a fluxpipe.memory.block_swap.BlockSwapper streams the last blocks' weights

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor | None = None,
        guidance: Tensor | None = None,
        txt_attention_mask: Tensor | None = None,
        controlnet_residuals: list[Tensor] | None = None,
    ) -> Tensor:
        """Flux's signature: img [B, N, in], img_ids [B, N, 3], txt [B, L, ctx], txt_ids [B, L, 3],
        timesteps [B] in [0, 1], y ignored (Chroma has no CLIP-L), guidance [B] (None: 0),
        txt_attention_mask [B, L] (required; 1 = real token)."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("img and txt must be [batch, tokens, features] tensors")
        if txt_attention_mask is None:
            raise ValueError("Chroma needs the T5 attention mask (--apply_t5_attn_mask)")
        if controlnet_residuals:
            raise ValueError("Chroma has no ControlNet")
        img = self.img_in(img)
        if guidance is None:
            guidance = torch.zeros_like(timesteps)
        mods = self.distilled_guidance_layer(approximator_input(self.params, timesteps, guidance).to(img.dtype))
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        mask = chroma_key_mask(txt_attention_mask, img.shape[1])
        for i, block in enumerate(self.double_blocks):
            vec = block_modulations(mods, self.params, "double", i)
            img, txt = self._run_block(("double", i), block, (img, txt, vec, pe, mask))
        x = torch.cat((txt, img), dim=1)
        for j, block in enumerate(self.single_blocks):
            x = self._run_block(("single", j), block, (x, block_modulations(mods, self.params, "single", j), pe, mask))
        return self.final_layer(x[:, txt.shape[1] :, ...], block_modulations(mods, self.params, "final"))

    def _run_block(self, key: tuple[str, int], block: nn.Module, args: tuple) -> Any:  # Tensor | (Tensor, Tensor)
        if self.block_swapper is not None and key in self.block_swapper.blocks:
            return self.block_swapper.run(key, block, args, self.training)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def _count(keys: list[str], pattern: str) -> int:
    indices = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if indices and indices != set(range(max(indices) + 1)):
        raise ValueError(f"indices of {pattern} are not contiguous: {sorted(indices)}")
    return len(indices)


def infer_chroma_params(shapes: dict[str, tuple[int, ...]]) -> ChromaParams:
    """ChromaParams from a Chroma file's key -> shape map; KeyError / ValueError when it is no Chroma DiT."""
    from fluxpipe.models.flux import derived_axes_dim

    keys = list(shapes)
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    if hidden % head_dim:
        raise ValueError(f"hidden size {hidden} is not a multiple of the head dim {head_dim}")
    approx_hidden, approx_in = shapes["distilled_guidance_layer.in_proj.weight"]
    return ChromaParams(
        in_channels=in_channels,
        out_channels=shapes["final_layer.linear.weight"][0],
        context_in_dim=shapes["txt_in.weight"][1],
        hidden_size=hidden,
        mlp_ratio=shapes["double_blocks.0.img_mlp.0.weight"][0] / hidden,
        num_heads=hidden // head_dim,
        depth=_count(keys, r"double_blocks\.(\d+)\."),
        depth_single_blocks=_count(keys, r"single_blocks\.(\d+)\."),
        axes_dim=derived_axes_dim(head_dim),
        theta=10_000,
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
        approximator_in_dim=approx_in,
        approximator_depth=_count(keys, r"distilled_guidance_layer\.layers\.(\d+)\."),
        approximator_hidden_size=approx_hidden,
    )


def is_chroma(model: nn.Module) -> bool:
    """Whether a DiT is a Chroma (no CLIP-L, T5 mask required, real CFG when sampling)."""
    return isinstance(getattr(model, "params", None), ChromaParams)


__all__ = ["CHROMA", "Chroma", "ChromaParams", "infer_chroma_params", "is_chroma", "tiny_chroma"]
