"""FLUX.1 Kontext [dev]: image editing by in-context reference tokens (BFL's sampling code is the specification).

Kontext is the FLUX.1-dev transformer (same shapes, same keys: a file cannot tell them apart, so fluxpipe
needs ``--model_type kontext``) run on a longer image sequence: the target's packed tokens with ids
(0, row, col), then the reference image's packed latent tokens with ids (1, row, col) — the first RoPE
axis marks the reference, its rows and columns start at 0 like the target's. The model's prediction is
sliced back to the target tokens; the reference tokens are never noised, and the loss sees only the
target. For sampling the official code resizes the reference to the Kontext resolution nearest its aspect
ratio (``kontext_resolution``). Pure functions, no state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fluxpipe.maths.packing import image_ids, pack_latents

# (width, height) of the resolutions Kontext was trained on (BFL's list), all multiples of 16.
KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)
REFERENCE_AXIS_INDEX = 1.0  # the first id axis of every reference token (the target's is 0)


def kontext_resolution(width: int, height: int) -> tuple[int, int]:
    """The Kontext resolution (width, height) whose aspect ratio is nearest width/height (first on a tie),
    rounded down to multiples of 16 (as the official reference resize does)."""
    aspect = width / height
    _, w, h = min((abs(aspect - rw / rh), rw, rh) for rw, rh in KONTEXT_RESOLUTIONS)
    return 16 * (w // 16), 16 * (h // 16)


def reference_ids(
    batch: int, height: int, width: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """[B, (H/2)(W/2), 3] ids (1, row, col) of a reference latent H x W (latent sizes, like ``image_ids``)."""
    ids = image_ids(batch, height, width, device=device, dtype=dtype)
    ids[..., 0] = REFERENCE_AXIS_INDEX
    return ids


def reference_tokens(reference: Tensor) -> tuple[Tensor, Tensor]:
    """(tokens [B, N_ref, 64], ids [B, N_ref, 3]) of a reference latent [B, 16, H, W] (already scaled and
    shifted like a target latent)."""
    _, _, h, w = reference.shape
    return pack_latents(reference), reference_ids(
        reference.shape[0], h, w, device=reference.device, dtype=reference.dtype
    )


def join_reference(img: Tensor, img_ids: Tensor, ref: Tensor, ref_ids: Tensor) -> tuple[Tensor, Tensor]:
    """The Kontext image sequence: target tokens then reference tokens, along the sequence axis (ids too)."""
    if ref.shape[0] != img.shape[0]:
        if ref.shape[0] != 1:
            raise ValueError(f"reference batch {ref.shape[0]} does not match the image batch {img.shape[0]}")
        ref, ref_ids = ref.expand(img.shape[0], -1, -1), ref_ids.expand(img.shape[0], -1, -1)
    return torch.cat((img, ref.to(img.dtype)), dim=1), torch.cat((img_ids, ref_ids.to(img_ids.dtype)), dim=1)


def kontext_forward(
    model: torch.nn.Module,
    img: Tensor,
    img_ids: Tensor,
    reference: tuple[Tensor, Tensor] | None,
    **kwargs: Tensor | None,
) -> Tensor:
    """The DiT's prediction for the target tokens ``img`` [B, N, 64]: with ``reference`` = (tokens, ids) the
    reference tokens are appended to the sequence and the output sliced back to the first N tokens."""
    if reference is None:
        return model(img=img, img_ids=img_ids, **kwargs)
    seq, seq_ids = join_reference(img, img_ids, *reference)
    return model(img=seq, img_ids=seq_ids, **kwargs)[:, : img.shape[1]]
