"""Uncached latents (the reference without --cache_latents) for the subsets whose images change every step
(``random_crop``, ``color_aug``): the AE encodes their images each step (``fluxpipe.data.augment``); the other
subsets' latents, and the validation split's, still come from the latent cache.

The draws of an item's image at a step come from ``random.Random("fluxpipe.image:seed:epoch:step:item")``, so a
resumed run sees the same images.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fluxpipe.data.augment import ImageAugment, fresh_pixels
from fluxpipe.data.epochs import TrainItem


@dataclass(frozen=True, kw_only=True, slots=True)
class LiveLatents:
    """The AE and the image keys of every subset ([dataset][subset])."""

    ae: Path
    augments: tuple[tuple[ImageAugment, ...], ...] = ()
    seed: int = 42

    def fresh(self, item: TrainItem) -> bool:
        return self.augments[item.dataset][item.subset].fresh


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
    def moments(self, item: TrainItem, flipped: bool, epoch: int, step: int) -> tuple[Tensor, Tensor] | None:
        if not self.live.fresh(item):
            return None
        aug = self.live.augments[item.dataset][item.subset]
        rng = image_rng(self.live.seed, epoch, step, item.caption_id)
        x = fresh_pixels(
            Path(item.image), item.resized, item.crop, item.bucket, item.interpolation or None, flipped, aug, rng
        )
        out = self.ae.encoder(x[None].to(self.device, self.dtype)).float().cpu()
        mean, logvar = out.chunk(2, dim=1)
        return mean[0], logvar[0]
