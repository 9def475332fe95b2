"""Packing FLUX latents into 2x2 patch tokens, and the position ids the DiT's RoPE reads (spec §4.1).

Latents are [B, C, H, W] with H, W the *latent* sizes (pixels / 8, both even); tokens are
[B, (H/2)(W/2), 4C] in row-major order, feature index = c*4 + ph*2 + pw. Image token (r, c) has
id (0, r, c); text tokens have id (0, 0, 0). Pure functions, no state.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor


def _check_even(height: int, width: int) -> None:
    if height % 2 or width % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {height}x{width}")


def num_image_tokens(height: int, width: int) -> int:
    """Packed token count (H/2)*(W/2) for a latent of height x width (the `image_seq_len` of flux_shift)."""
    _check_even(height, width)
    return (height // 2) * (width // 2)


def pack_latents(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: `b c (h ph) (w pw) -> b (h w) (c ph pw)`, ph = pw = 2.

    Raises ValueError if x is not 4-D or H or W is odd.
    """
    if x.ndim != 4:
        raise ValueError(f"expected latents [B, C, H, W], got shape {tuple(x.shape)}")
    _check_even(x.shape[2], x.shape[3])
    return rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack_latents(x: Tensor, height: int, width: int) -> Tensor:
    """[B, (H/2)(W/2), 4C] -> [B, C, H, W], the exact inverse of `pack_latents`.

    ``height``/``width`` are the latent H, W (not pixels, not token counts).
    """
    _check_even(height, width)
    if x.ndim != 3 or x.shape[1] != (height // 2) * (width // 2) or x.shape[2] % 4:
        raise ValueError(f"tokens of shape {tuple(x.shape)} do not pack a {height}x{width} latent")
    return rearrange(x, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=height // 2, w=width // 2, ph=2, pw=2)


def image_ids(
    batch: int, height: int, width: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """[B, (H/2)(W/2), 3] ids (0, row, col) in the row-major token order of `pack_latents`.

    ``height``/``width`` are the latent H, W; rows run over H/2, columns over W/2.
    """
    _check_even(height, width)
    rows, cols = height // 2, width // 2
    ids = torch.zeros(rows, cols, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(cols, device=device, dtype=dtype)[None, :]
    return ids.reshape(1, rows * cols, 3).repeat(batch, 1, 1)


def text_ids(
    batch: int, length: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """[B, L, 3] zeros: every text token sits at position (0, 0, 0)."""
    return torch.zeros(batch, length, 3, device=device, dtype=dtype)
