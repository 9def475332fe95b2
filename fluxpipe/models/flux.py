"""The FLUX.1 diffusion transformer (``Flux``) and its hyper-parameters (``FluxParams``).

Module tree and names follow the official model code, so ``flux1-dev.safetensors`` /
``flux1-schnell.safetensors`` load with ``strict=True`` (spec §1.1-1.3). Presets are derived
from one base with ``dataclasses.replace``; ``infer_flux_params`` reads hyper-parameters back
from a checkpoint's key names and shapes (block counts, widths, guidance embedding).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Protocol, cast

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fluxpipe.memory.block_swap import BlockSwapper
from fluxpipe.memory.offload_checkpoint import offloaded_checkpoint
from fluxpipe.models.layers import (
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    SingleStreamBlock,
    timestep_embedding,
)


@dataclass
class FluxParams:
    """Hyper-parameters of a FLUX.1 DiT (official field names)."""

    in_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: list[int]
    theta: int
    qkv_bias: bool
    guidance_embed: bool
    out_channels: int | None = None  # None: same as in_channels

    def __post_init__(self) -> None:
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        if sum(self.axes_dim) != head_dim:
            raise ValueError(f"sum(axes_dim)={sum(self.axes_dim)} must equal the head dim {head_dim}")


FLUX1_DEV = FluxParams(
    in_channels=64,
    out_channels=64,
    vec_in_dim=768,
    context_in_dim=4096,
    hidden_size=3072,
    mlp_ratio=4.0,
    num_heads=24,
    depth=19,
    depth_single_blocks=38,
    axes_dim=[16, 56, 56],
    theta=10_000,
    qkv_bias=True,
    guidance_embed=True,
)
PRESETS: dict[str, FluxParams] = {
    "dev": FLUX1_DEV,
    "schnell": replace(FLUX1_DEV, axes_dim=list(FLUX1_DEV.axes_dim), guidance_embed=False),
}


def tiny(guidance_embed: bool = True, *, vec_in_dim: int = 32, context_in_dim: int = 32) -> FluxParams:
    """A FLUX.1-shaped model small enough for CPU tests and the demo (head dim 32, axes [4, 14, 14])."""
    return replace(
        FLUX1_DEV,
        vec_in_dim=vec_in_dim,
        context_in_dim=context_in_dim,
        hidden_size=64,
        num_heads=2,
        depth=2,
        depth_single_blocks=2,
        axes_dim=[4, 14, 14],
        guidance_embed=guidance_embed,
    )


class Flux(nn.Module):
    """Transformer for flow matching on packed latent sequences (img [B, N, 64] -> velocity [B, N, 64])."""

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels or params.in_channels  # (FluxParams fills it in)
        pe_dim = params.hidden_size // params.num_heads
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=pe_dim, theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = nn.Linear(self.in_channels, self.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, self.hidden_size)
        self.guidance_in = MLPEmbedder(256, self.hidden_size) if params.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(params.context_in_dim, self.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(self.hidden_size, self.num_heads, params.mlp_ratio, params.qkv_bias)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(self.hidden_size, self.num_heads, mlp_ratio=params.mlp_ratio)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(self.hidden_size, 1, self.out_channels)
        self.gradient_checkpointing = False  # recompute each block in the backward pass (training memory)
        self.cpu_offload_checkpointing = False  # ... and keep the checkpointed block inputs in host memory
        self.block_swapper: BlockSwapper | None = None  # streams the last blocks' weights (--blocks_to_swap)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        txt_attention_mask: Tensor | None = None,
        controlnet_residuals: list[Tensor] | None = None,
    ) -> Tensor:
        """img [B, N, in], img_ids [B, N, 3], txt [B, L, ctx], txt_ids [B, L, 3], timesteps [B] in [0, 1],
        y [B, vec], guidance [B] (dev), txt_attention_mask [B, L] (1 = real token; masks text keys only),
        controlnet_residuals: [B, N, C] tensors from a ControlNet, residual i % len added after double block i."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("img and txt must be [batch, tokens, features] tensors")
        img = self.img_in(img)
        vec = conditioning_vector(self, timesteps, y, guidance)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        mask = joint_key_mask(txt_attention_mask, img.shape[1]) if txt_attention_mask is not None else None
        for i, block in enumerate(self.double_blocks):
            img, txt = self._run_block(("double", i), block, (img, txt, vec, pe, mask))
            if controlnet_residuals:
                img = img + controlnet_residuals[i % len(controlnet_residuals)]
        x = torch.cat((txt, img), dim=1)
        for j, block in enumerate(self.single_blocks):
            x = cast(Tensor, self._run_block(("single", j), block, (x, vec, pe, mask)))  # a single block: one tensor
        x = x[:, txt.shape[1] :, ...]
        return self.final_layer(x, vec)

    def _run_block(self, key: tuple[str, int], block: nn.Module, args: tuple) -> Tensor | tuple[Tensor, ...]:
        """One block: streamed by the block swapper, checkpointed (optionally with its inputs in host memory),
        or called directly."""
        if self.block_swapper is not None and key in self.block_swapper.blocks:
            return self.block_swapper.run(key, block, args, self.training)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            if self.cpu_offload_checkpointing:
                return offloaded_checkpoint(block, *args)
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


class Embedders(Protocol):
    """What ``conditioning_vector`` reads of a model: its params and the time, guidance and vector embedders."""

    @property
    def params(self) -> FluxParams: ...
    @property
    def time_in(self) -> nn.Module: ...
    @property
    def guidance_in(self) -> nn.Module: ...
    @property
    def vector_in(self) -> nn.Module: ...


def conditioning_vector(model: Embedders, timesteps: Tensor, y: Tensor, guidance: Tensor | None) -> Tensor:
    """The modulation vector of a FLUX.1 model (or a ControlNet-Flux, which has the same embedders):
    time_in(t) [+ guidance_in(g) for dev] + vector_in(y)."""
    vec = model.time_in(timestep_embedding(timesteps, 256))
    if model.params.guidance_embed:
        if guidance is None:
            raise ValueError("this FLUX.1 model has a guidance embedding (dev): pass `guidance`")
        vec = vec + model.guidance_in(timestep_embedding(guidance, 256))
    return vec + model.vector_in(y)


def joint_key_mask(txt_mask: Tensor, n_img: int) -> Tensor:
    """[B, L] text mask -> bool [B, 1, 1, L + n_img]: text keys masked where 0, image keys always visible."""
    img_mask = torch.ones(txt_mask.shape[0], n_img, dtype=torch.bool, device=txt_mask.device)
    return torch.cat((txt_mask.bool(), img_mask), dim=1)[:, None, None, :]


def derived_axes_dim(head_dim: int) -> list[int]:
    """RoPE axes for a head dim: FLUX.1 splits 128 as [16, 56, 56]; the same 1/8 : 7/16 : 7/16 rule elsewhere."""
    first = head_dim // 8
    rest = head_dim - first
    axes = [first, rest // 2, rest - rest // 2]
    if any(a % 2 for a in axes) or first == 0:
        raise ValueError(f"no RoPE axes split for head dim {head_dim} (needs a multiple of 32)")
    return axes


def _count_blocks(keys: list[str], pattern: str) -> int:
    indices = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if indices and indices != set(range(max(indices) + 1)):
        missing = sorted(set(range(max(indices) + 1)) - indices)
        raise ValueError(f"block indices are not contiguous: missing {missing}")
    return len(indices)


def infer_flux_params(shapes: dict[str, tuple[int, ...]]) -> FluxParams:
    """FluxParams from a BFL-layout state dict's key -> shape map (no tensors needed).

    Raises ValueError (or KeyError for an absent key) when the shapes are not those of a FLUX.1 DiT.
    """
    keys = list(shapes)
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    if hidden % head_dim:
        raise ValueError(f"hidden size {hidden} is not a multiple of the head dim {head_dim}")
    mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0]
    return FluxParams(
        in_channels=in_channels,
        out_channels=shapes["final_layer.linear.weight"][0],
        vec_in_dim=shapes["vector_in.in_layer.weight"][1],
        context_in_dim=shapes["txt_in.weight"][1],
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim,
        depth=_count_blocks(keys, r"double_blocks\.(\d+)\."),
        depth_single_blocks=_count_blocks(keys, r"single_blocks\.(\d+)\."),
        axes_dim=derived_axes_dim(head_dim),
        theta=10_000,
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
        guidance_embed="guidance_in.in_layer.weight" in shapes,
    )


def flux_variant(params: FluxParams) -> str:
    """'dev' (guidance-distilled, has guidance_in) or 'schnell' (no guidance embedding)."""
    return "dev" if params.guidance_embed else "schnell"


def flux_size_class(params: FluxParams) -> str:
    """'full' for the official widths and block counts, 'pruned' for official widths with fewer blocks,
    'reduced' for other widths (test and demo models)."""
    base = PRESETS[flux_variant(params)]
    widths = ("in_channels", "out_channels", "vec_in_dim", "context_in_dim", "hidden_size", "num_heads")
    if any(getattr(params, w) != getattr(base, w) for w in widths) or params.mlp_ratio != base.mlp_ratio:
        return "reduced"
    if (params.depth, params.depth_single_blocks) == (base.depth, base.depth_single_blocks):
        return "full"
    return "pruned"


__all__ = ["Flux", "FluxParams", "PRESETS", "tiny", "infer_flux_params", "flux_variant", "flux_size_class"]
