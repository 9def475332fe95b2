"""Loss masks (spec §4.5): a subset's ``alpha_mask`` (the image's alpha channel) or, with ``--masked_loss``, the
conditioning image's R channel, as the reference reads them: values in [0, 1], resized and cropped exactly as the
image, then area-interpolated to the latent grid (``latent_mask``), which is what the latent cache stores.

An image without an alpha channel masks nothing (all ones, as the reference). A conditioning mask must have its
image's size: a mask of another size would not cover the same pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

from fluxpipe.data.images import BadImage, load_rgb, resize_and_crop
from fluxpipe.errors import FluxpipeError

LATENT_CELL = 8  # pixels per latent cell of the FLUX.1 AE


def latent_mask(mask: Tensor, height: int, width: int) -> Tensor:
    """A pixel mask [B, H, W] (or [H, W]) in [0, 1] on the latent grid [B, height, width] by area interpolation
    (the mean of each cell), as the reference's ``F.interpolate(mode="area")``."""
    m = mask if mask.dim() == 3 else mask[None]
    return F.interpolate(m[:, None].float(), size=(height, width), mode="area")[:, 0]


def alpha_image(path: Path) -> Image.Image:
    """The EXIF-oriented alpha channel of an image as an 8-bit "L" image (255 everywhere without alpha)."""
    try:
        with Image.open(path) as img:
            img.load()
            oriented = ImageOps.exif_transpose(img)
    except (OSError, ValueError) as e:
        raise BadImage(f"{path}: cannot read the image for its alpha mask ({e})") from e
    if oriented.mode in ("RGBA", "LA", "PA") or "transparency" in oriented.info:
        return oriented.convert("RGBA").getchannel("A")
    return Image.new("L", oriented.size, 255)


def mask_pixels(
    source: str,
    path: Path,
    image_size: tuple[int, int],
    resized: tuple[int, int],
    crop: tuple[int, int],
    bucket: tuple[int, int],
    interpolation: str | None = None,
) -> Tensor:
    """[H, W] float32 in [0, 1]: the mask of ``source`` "alpha" (``path`` is the image) or "conditioning"
    (``path`` is the conditioning image, whose R channel is the mask), resized and cropped as the image.

    Raises FluxpipeError (one line) when a conditioning mask is not ``image_size`` (W, H)."""
    if source == "alpha":
        plane = alpha_image(path)
    else:
        rgb = load_rgb(path)
        if rgb.size != tuple(image_size):
            raise FluxpipeError(
                f"{path}: the mask is {rgb.size[0]}x{rgb.size[1]} but its image is {image_size[0]}x{image_size[1]}; "
                "a --masked_loss mask (conditioning_data_dir) must have the size of its image"
            )
        plane = rgb.getchannel("R")
    cropped = resize_and_crop(plane, resized, crop[0], crop[1], bucket, interpolation)
    return torch.from_numpy(np.array(cropped, dtype=np.float32) / 255.0)


def cached_mask(pixels: Tensor, flip: bool) -> Tensor:
    """What the latent cache stores: the mask on the latent grid [H/8, W/8], mirrored for a flipped entry."""
    h, w = pixels.shape
    m = latent_mask(pixels, h // LATENT_CELL, w // LATENT_CELL)[0]
    return m.flip(-1) if flip else m
