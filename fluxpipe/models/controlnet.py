"""The FLUX.1 ControlNet of kohya-ss sd-scripts (``ControlNetFlux``, after XLabs' x-flux ControlNet), spec §7.2.

A shallow copy of the base model's input side: its own ``img_in``, ``time_in``, ``vector_in``,
``guidance_in`` (dev only), ``txt_in`` and ``pe_embedder``, then ``controlnet_depth`` (default 2)
``DoubleStreamBlock``s and no single blocks. The control image (RGB, full pixel resolution, [-1, 1])
goes through ``input_hint_block`` (8 convs 3x3, SiLU between, stride 2 at Sequential indices 4, 8, 12:
B x 3 x H x W -> B x 16 x H/8 x W/8), is packed 2x2 like the latents (64 features per token), projected
by ``pos_embed_input`` and added to ``img_in(img)``. After each double block the image stream goes
through ``controlnet_blocks.<i>`` (Linear C -> C); these outputs are the residuals that
``Flux.forward(..., controlnet_residuals=...)`` adds after base double block i (residual i % depth).

State-dict layout (C = hidden size; FLUX.1: C = 3072, 64 in, 4096 T5, 768 CLIP)::

    img_in.{weight,bias}                 [C, 64], [C]
    time_in.{in,out}_layer.*, vector_in.*, guidance_in.* (dev), txt_in.*   as in Flux
    double_blocks.{0,1}.*                as Flux's double blocks
    controlnet_blocks.{0,1}.{weight,bias}  [C, C], [C]          (zero-initialised)
    pos_embed_input.{weight,bias}        [C, 64], [C]
    input_hint_block.0.{weight,bias}     [16, 3, 3, 3], [16]
    input_hint_block.{2,4,...,14}.*      [16, 16, 3, 3], [16]  (index 14 zero-initialised)

A fresh model uses PyTorch's default init except for the zero-initialised layers, so its residuals
are exactly zero and the base model's output is unchanged until the ControlNet has trained.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fluxpipe.errors import CheckpointError, summarize
from fluxpipe.models.flux import FluxParams, conditioning_vector, joint_key_mask
from fluxpipe.models.layers import DoubleStreamBlock, EmbedND, MLPEmbedder

HINT_CHANNELS = 16  # channels out of input_hint_block
HINT_FEATURES = HINT_CHANNELS * 2 * 2  # per token after 2x2 packing
_HINT_STRIDED = (4, 8, 12)  # Sequential indices of the stride-2 convs


def _zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def input_hint_block() -> nn.Sequential:
    """Conv 3->16, then 7 convs 16->16 (3x3, padding 1), SiLU between; the last conv zero-initialised."""
    layers: list[nn.Module] = []
    for index in range(0, 16, 2):
        if index:
            layers.append(nn.SiLU())
        stride = 2 if index in _HINT_STRIDED else 1
        conv = nn.Conv2d(3 if index == 0 else HINT_CHANNELS, HINT_CHANNELS, 3, padding=1, stride=stride)
        layers.append(_zero_module(conv) if index == 14 else conv)
    return nn.Sequential(*layers)


class ControlNetFlux(nn.Module):
    """ControlNet for a FLUX.1 DiT: (latents, control image, conditioning) -> one residual per double block."""

    def __init__(self, params: FluxParams, controlnet_depth: int = 2):
        super().__init__()
        if params.in_channels != HINT_FEATURES:
            raise ValueError(
                f"ControlNetFlux needs in_channels={HINT_FEATURES} (16-channel latents packed 2x2), "
                f"got {params.in_channels}"
            )
        if controlnet_depth < 1:
            raise ValueError(f"controlnet_depth must be at least 1, got {controlnet_depth}")
        self.params = params
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        pe_dim = params.hidden_size // params.num_heads
        self.pe_embedder = EmbedND(dim=pe_dim, theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = nn.Linear(params.in_channels, self.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, self.hidden_size)
        self.guidance_in = MLPEmbedder(256, self.hidden_size) if params.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(params.context_in_dim, self.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(self.hidden_size, self.num_heads, params.mlp_ratio, params.qkv_bias)
            for _ in range(controlnet_depth)
        )
        self.controlnet_blocks = nn.ModuleList(
            _zero_module(nn.Linear(self.hidden_size, self.hidden_size)) for _ in range(controlnet_depth)
        )
        self.pos_embed_input = nn.Linear(HINT_FEATURES, self.hidden_size, bias=True)
        self.input_hint_block = input_hint_block()
        self.gradient_checkpointing = False  # recompute each double block in the backward pass

    def embed_hint(self, controlnet_cond: Tensor) -> Tensor:
        """Control image [B, 3, H, W] -> [B, (H/16)(W/16), C] tokens in the latents' packing order."""
        if controlnet_cond.ndim != 4 or controlnet_cond.shape[1] != 3:
            raise ValueError(f"controlnet_cond must be [batch, 3, height, width], got {tuple(controlnet_cond.shape)}")
        hint = self.input_hint_block(controlnet_cond)
        hint = rearrange(hint, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)
        return self.pos_embed_input(hint)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        controlnet_cond: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        txt_attention_mask: Tensor | None = None,
    ) -> list[Tensor]:
        """Inputs as ``Flux.forward`` plus controlnet_cond [B, 3, H, W] (H, W = 16 x the latent token grid).
        Returns ``controlnet_depth`` residuals [B, N, C] (sd-scripts also returns an empty single-block tuple)."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("img and txt must be [batch, tokens, features] tensors")
        hint = self.embed_hint(controlnet_cond)
        if hint.shape[1] != img.shape[1]:
            raise ValueError(
                f"control image gives {hint.shape[1]} tokens but the latents have {img.shape[1]}: "
                f"its height and width must be 16 x the packed latent grid"
            )
        img = self.img_in(img) + hint
        vec = conditioning_vector(self, timesteps, y, guidance)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        mask = joint_key_mask(txt_attention_mask, img.shape[1]) if txt_attention_mask is not None else None
        residuals = []
        for block, controlnet_block in zip(self.double_blocks, self.controlnet_blocks, strict=True):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                img, txt = checkpoint(block, img, txt, vec, pe, mask, use_reentrant=False)
            else:
                img, txt = block(img, txt, vec, pe, mask)
            residuals.append(controlnet_block(img))
        return residuals


def controlnet_key_shapes(params: FluxParams, controlnet_depth: int = 2) -> dict[str, tuple[int, ...]]:
    """The state-dict key -> shape table of a ControlNetFlux for these base hyper-parameters (meta device)."""
    with torch.device("meta"):
        model = ControlNetFlux(params, controlnet_depth)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_controlnet_state(model: ControlNetFlux, state_dict: dict[str, Tensor]) -> None:
    """Load strictly: every key present, none extra, every shape equal; else one CheckpointError naming them."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(v.shape)} != {expected[k]}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    problems = [
        f"{label}: {summarize(keys)}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", mismatched))
        if keys
    ]
    if problems:
        raise CheckpointError(
            "ControlNet state dict does not match ControlNetFlux "
            f"(depth {len(model.double_blocks)}): " + "; ".join(problems)
        )
    model.load_state_dict(state_dict, strict=True)


class ControlledFlux(nn.Module):
    """The base DiT with a ControlNet's residuals for one control image batch: called like ``Flux``."""

    def __init__(self, dit: nn.Module, controlnet: ControlNetFlux, hint: Tensor) -> None:
        super().__init__()
        self.dit, self.controlnet, self.hint = dit, controlnet, hint
        self.params = dit.params

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
    ) -> Tensor:
        residuals = self.controlnet(
            img=img,
            img_ids=img_ids,
            controlnet_cond=self.hint.to(img.dtype),
            txt=txt,
            txt_ids=txt_ids,
            timesteps=timesteps,
            y=y,
            guidance=guidance,
            txt_attention_mask=txt_attention_mask,
        )
        return self.dit(
            img=img,
            img_ids=img_ids,
            txt=txt,
            txt_ids=txt_ids,
            timesteps=timesteps,
            y=y,
            guidance=guidance,
            txt_attention_mask=txt_attention_mask,
            controlnet_residuals=[r.to(img.dtype) for r in residuals],
        )


__all__ = ["ControlNetFlux", "ControlledFlux", "controlnet_key_shapes", "load_controlnet_state", "input_hint_block"]
