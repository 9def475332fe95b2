"""The per-item loss reduction of the reference (spec §4.5), as small pure functions.

Element-wise loss (already × the sigma_scaled weighting) → × the loss mask (``--masked_loss`` or ``alpha_mask``:
values in [0, 1] on the latent grid, area-downsampled from the image; no renormalisation) → mean over every
non-batch dimension → × the item's loss weight (``prior_loss_weight`` for regularisation images, else 1). The
caller averages the result over the batch.
"""

from __future__ import annotations

from torch import Tensor

from fluxpipe.maths.packing import pack_latents


def weighted_loss(per_element: Tensor, mask: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
    """[B, ...] element-wise loss → [B]: × ``mask`` (broadcast against it), mean over all but the batch
    dimension, × ``weights`` [B]."""
    loss = per_element if mask is None else per_element * mask.to(per_element.dtype)
    loss = loss.reshape(loss.shape[0], -1).mean(dim=1)
    return loss if weights is None else loss * weights.to(loss.dtype)


def packed_mask(mask: Tensor, channels: int = 16) -> Tensor:
    """A latent-grid mask [B, h, w] laid out like the packed loss [B, h/2·w/2, channels·4]: every channel of a
    latent pixel gets that pixel's value."""
    return pack_latents(mask[:, None].expand(-1, channels, -1, -1).contiguous())
