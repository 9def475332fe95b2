"""Per-step image augmentation as the reference does it with latent caching off: ``random_crop``, ``color_aug``
and ``face_crop_aug_range`` (``flip_aug`` is cached: both orientations are encoded once).

``fresh_image`` loads an image, resizes it to its manifest plan, crops the bucket at a random origin
(``random_crop``: the reference's ``random.randint(0, trim)`` per axis, width first; else the manifest's centred
crop) or, for an image whose file name holds a face (``face_crop``), scales and cuts it around the face
(``fluxpipe.data.face_crop``); then it applies the colour augmentation, then flips: the reference's order. ``color_aug`` is the reference's
``AugHelper.color_aug``: with p = 0.33 either (p = 0.5) a hue shift of U(-8, 8) on OpenCV's 0..180 hue scale of
the array read as BGR (the reference hands its RGB array to ``cv2.COLOR_BGR2HSV``; this is a NumPy port of that
conversion, rounding as OpenCV does up to one level), or a gamma U(0.95, 1.05) applied to the 0..255 values
themselves (``clip(x ** gamma, 0, 255)``, as the reference). The draws come from a ``random.Random``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fluxpipe.data.face_crop import CropPlan, face_box, face_crop_plan
from fluxpipe.data.images import load_rgb, resize_and_crop, to_tensor

HUE_SHIFT_LIMIT = 8


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageAugment:
    """The per-step image keys of one subset."""

    random_crop: bool = False
    color_aug: bool = False
    face_crop: tuple[float, float] | None = None
    """face_crop_aug_range of a subset whose dataset is not bucketed (the reference ignores it with buckets)."""

    @property
    def fresh(self) -> bool:
        """Whether the subset's latents must be encoded each step."""
        return self.random_crop or self.color_aug or self.face_crop is not None


def random_crop_origin(resized: tuple[int, int], bucket: tuple[int, int], rng: random.Random) -> tuple[int, int]:
    """(left, top) of the bucket in the resized image: ``rng.randint(0, trim)`` per axis that has a trim."""
    left = rng.randint(0, resized[0] - bucket[0]) if resized[0] > bucket[0] else 0
    top = rng.randint(0, resized[1] - bucket[1]) if resized[1] > bucket[1] else 0
    return left, top


def _bgr_to_hsv(img: np.ndarray) -> np.ndarray:
    """OpenCV's uint8 BGR -> HSV (H in 0..179, S and V in 0..255)."""
    x = img.astype(np.float64)
    b, g, r = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(-1)
    diff = v - x.min(-1)
    s = np.where(v > 0, diff * 255.0 / np.maximum(v, 1e-12), 0.0)
    safe = np.maximum(diff, 1e-12)
    h = np.where(
        v == r, 60.0 * (g - b) / safe, np.where(v == g, 120.0 + 60.0 * (b - r) / safe, 240.0 + 60.0 * (r - g) / safe)
    )
    h = np.where(diff == 0, 0.0, h)
    h = np.where(h < 0, h + 360.0, h)
    return np.stack([np.round(h / 2.0) % 180, np.round(s), v], -1).astype(np.uint8)


def _hsv_to_bgr(hsv: np.ndarray) -> np.ndarray:
    """OpenCV's uint8 HSV -> BGR."""
    h = hsv[..., 0].astype(np.float64) * 2.0 / 60.0
    s, v = hsv[..., 1] / 255.0, hsv[..., 2].astype(np.float64)
    i = np.floor(h).astype(int) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb_sets = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    r = np.choose(i, [c[0] for c in rgb_sets])
    g = np.choose(i, [c[1] for c in rgb_sets])
    b = np.choose(i, [c[2] for c in rgb_sets])
    return np.clip(np.round(np.stack([b, g, r], -1)), 0, 255).astype(np.uint8)


def color_aug(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """The reference's colour augmentation of a uint8 [H, W, 3] array (module docstring)."""
    if rng.random() <= 0.33:
        if rng.random() > 0.5:
            hsv = _bgr_to_hsv(image)
            shift = rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT)
            if shift < 0:
                shift = 180 + shift
            hsv[..., 0] = ((hsv[..., 0] + shift) % 180).astype(np.uint8)  # (truncated, as numpy's assignment)
            return _hsv_to_bgr(hsv)
        gamma = rng.uniform(0.95, 1.05)
        return np.clip(image.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)
    return image


def step_crop(
    path: Path,
    size: tuple[int, int],
    resized: tuple[int, int],
    crop: tuple[int, int],
    bucket: tuple[int, int],
    aug: ImageAugment,
    rng: random.Random,
) -> CropPlan:
    """This step's scaling and crop origin of an image of ``size``: around its face (``face_crop`` and a face in
    the file name), else the manifest's ``resized`` cut at a random origin (``random_crop``) or at ``crop``."""
    face = face_box(path) if aug.face_crop is not None else None
    if face is not None and aug.face_crop is not None:
        return face_crop_plan(size, bucket, face, aug.face_crop, aug.random_crop, rng)
    origin = random_crop_origin(resized, bucket, rng) if aug.random_crop else crop
    return CropPlan(resized=resized, origin=origin)


def fresh_image(
    path: Path,
    resized: tuple[int, int],
    crop: tuple[int, int],
    bucket: tuple[int, int],
    interpolation: str | None,
    flip: bool,
    aug: ImageAugment,
    rng: random.Random,
) -> tuple[torch.Tensor, CropPlan]:
    """One step's [3, H, W] image in [-1, 1]: resized and cropped (``step_crop``), colour-augmented, flipped
    (module docstring); and the crop it was cut with (a loss mask is cut the same way)."""
    image = load_rgb(path)
    plan = step_crop(path, image.size, resized, crop, bucket, aug, rng)
    image = resize_and_crop(image, plan.resized, plan.origin[0], plan.origin[1], bucket, interpolation)
    if aug.color_aug:
        image = Image.fromarray(color_aug(np.asarray(image), rng))
    x = to_tensor(image)
    return (x.flip(-1) if flip else x), plan
