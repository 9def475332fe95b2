"""Uncached latents (the reference without --cache_latents) for the subsets whose images change every step
(``random_crop``, ``color_aug``, ``face_crop_aug_range``): the AE encodes their images each step
(``fluxpipe.data.augment``), and an item's loss mask (``alpha_mask``, or ``--masked_loss``'s conditioning image) is
cut with the same crop, as the reference cuts the alpha channel with its image; the other subsets' latents, and the
validation split's, still come from the latent cache.

The draws of an item's image at a step come from ``random.Random("fluxpipe.image:seed:epoch:step:item")``, so a
resumed run sees the same images.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fluxpipe.data.augment import ImageAugment, fresh_image
from fluxpipe.data.epochs import TrainItem
from fluxpipe.data.face_crop import check_face_image, face_box
from fluxpipe.data.masks import cached_mask, mask_pixels


@dataclass(frozen=True, kw_only=True, slots=True)
class LiveLatents:
    """The AE and the image keys of every subset ([dataset][subset])."""

    ae: Path
    augments: tuple[tuple[ImageAugment, ...], ...] = ()
    seed: int = 42

    def fresh(self, item: TrainItem) -> bool:
        return self.augments[item.dataset][item.subset].fresh

    def check(self, items: list[TrainItem]) -> None:
        """Raise FluxpipeError (one line) for the first face-crop item whose file name holds a malformed face, or
        whose image is smaller than its training size (before the first step, not at it)."""
        for item in items:
            if self.augments[item.dataset][item.subset].face_crop is not None and face_box(item.image) is not None:
                check_face_image(item.image, item.size, item.bucket)


def image_rng(seed: int, epoch: int, step: int, item: str) -> random.Random:
    return random.Random(f"fluxpipe.image:{int(seed)}:{int(epoch)}:{int(step)}:{item}")


class LatentEncoder:
    """The AE's encoder loaded once on ``device``; ``moments(item, flipped, epoch, step)`` is (mean, logvar)
    [16, H/8, W/8] float32 of the item's image at that step, or None for an item of a cached subset."""

    def __init__(self, live: LiveLatents, device: str) -> None:
        from fluxpipe.io.checkpoints import load_ae
        from fluxpipe.parallel.devices import encode_dtype

        self.live, self.device, self.dtype = live, device, encode_dtype(device)
        self.ae = load_ae(live.ae, dtype=self.dtype, device=device).eval().requires_grad_(False)

    @torch.no_grad()
    def moments(
        self, item: TrainItem, flipped: bool, epoch: int, step: int
    ) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """(mean, logvar, loss mask [H/8, W/8] or None) of the item's image at that step; None if cached."""
        if not self.live.fresh(item):
            return None
        aug = self.live.augments[item.dataset][item.subset]
        rng = image_rng(self.live.seed, epoch, step, item.caption_id)
        interpolation = item.interpolation or None
        x, plan = fresh_image(Path(item.image), item.resized, item.crop, item.bucket, interpolation, flipped, aug, rng)
        out = self.ae.encoder(x[None].to(self.device, self.dtype)).float().cpu()
        mean, logvar = out.chunk(2, dim=1)
        mask = None
        if item.mask_source:
            path = Path(item.image if item.mask_source == "alpha" else item.conditioning)
            pixels = mask_pixels(
                item.mask_source, path, item.size, plan.resized, plan.origin, item.bucket, interpolation
            )
            mask = cached_mask(pixels, flipped)
        return mean[0], logvar[0], mask
