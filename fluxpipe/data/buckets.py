"""Aspect-ratio bucketing: which (W, H) training size an image gets, and how it is scaled and cropped to it.

Inputs are a BucketSpec (the dataset's resolution and bucket settings) and an image's pixel size;
outputs are the predefined bucket list and a ResizePlan (bucket, scaled size, centre-crop offsets).
The rules follow the reference trainer (kohya sd-scripts BucketManager), so a dataset buckets the same
way in both. Pure arithmetic: no image I/O here (fluxpipe.data.images applies a plan to pixels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fluxpipe.errors import FluxpipeError

# The AE downsamples by 8 and FLUX packs latents 2x2, so every pixel size must be a multiple of 16.
PIXEL_MULTIPLE = 16


class BucketError(FluxpipeError, ValueError):
    """Bad bucket settings or an image too small to bucket (a ValueError too, as the reference raises)."""


@dataclass(frozen=True)
class BucketSpec:
    resolution: tuple[int, int]  # (W, H); max area A = W*H
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False


@dataclass(frozen=True)
class ResizePlan:
    bucket: tuple[int, int]  # (W, H) final size
    resized: tuple[int, int]  # (W, H) after scaling; covers the bucket
    crop_left: int  # centre-crop offsets into the resized image
    crop_top: int
    upscale: bool  # resized area larger than the original's


def snapped_min_max(spec: BucketSpec) -> tuple[int, int]:
    """min_bucket_reso rounded down and max_bucket_reso rounded up to multiples of bucket_reso_steps."""
    steps = spec.bucket_reso_steps
    lo = spec.min_bucket_reso - spec.min_bucket_reso % steps
    hi = spec.max_bucket_reso + (-spec.max_bucket_reso) % steps
    return lo, hi


def check_spec(spec: BucketSpec) -> None:
    """Raise BucketError (a ValueError) naming the bad setting; returns None when the spec is usable."""
    steps = spec.bucket_reso_steps
    if steps <= 0 or steps % PIXEL_MULTIPLE:
        raise BucketError(
            f"bucket_reso_steps={steps}: must be a positive multiple of {PIXEL_MULTIPLE} "
            "(the AE's factor 8 times FLUX's 2x2 latent packing)"
        )
    width, height = spec.resolution
    if width <= 0 or height <= 0:
        raise BucketError(f"resolution={spec.resolution}: both sides must be positive")
    if not spec.enable_bucket:
        # Without buckets the resolution is the training size itself; with buckets it only sets the area.
        if width % PIXEL_MULTIPLE or height % PIXEL_MULTIPLE:
            raise BucketError(
                f"resolution={spec.resolution}: both sides must be multiples of {PIXEL_MULTIPLE} "
                "when enable_bucket is off (it is the training size)"
            )
        return
    lo, hi = snapped_min_max(spec)
    if lo < steps:
        raise BucketError(f"min_bucket_reso={spec.min_bucket_reso}: must be at least bucket_reso_steps={steps}")
    if min(width, height) < lo or max(width, height) > hi:
        raise BucketError(
            f"resolution={spec.resolution}: each side must lie within min_bucket_reso..max_bucket_reso "
            f"= {lo}..{hi} (after snapping to multiples of bucket_reso_steps={steps})"
        )


def make_buckets(spec: BucketSpec) -> list[tuple[int, int]]:
    """Predefined buckets, sorted and unique: [resolution] without buckets, [] with bucket_no_upscale
    (those buckets are per image, see no_upscale_bucket)."""
    check_spec(spec)
    if not spec.enable_bucket:
        return [spec.resolution]
    if spec.bucket_no_upscale:
        return []
    steps = spec.bucket_reso_steps
    area = spec.resolution[0] * spec.resolution[1]
    lo, hi = snapped_min_max(spec)
    side = math.isqrt(area) // steps * steps  # floor(sqrt(A)/steps)*steps, exact in integers
    found = {(side, side)}
    for width in range(lo, hi + 1, steps):
        height = min(hi, area // width // steps * steps)
        if height >= lo:
            found.add((width, height))
            found.add((height, width))
    return sorted(found)


def select_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The exact bucket if (width, height) is one, else the nearest aspect ratio (ties: first in sorted order)."""
    if not buckets:
        raise BucketError("select_bucket: the bucket list is empty")
    _check_size(width, height)
    ordered = sorted(buckets)
    if (width, height) in ordered:
        return (width, height)
    ratio = width / height
    # min() keeps the first of equal keys, which is the reference's argmin over sorted buckets.
    return min(ordered, key=lambda b: abs(b[0] / b[1] - ratio))


def cover_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """Size that keeps the aspect ratio and covers the bucket: match the side that would otherwise fall short."""
    bw, bh = bucket
    scale = bh / height if width / height > bw / bh else bw / width
    resized_w = int(width * scale + 0.5)
    resized_h = int(height * scale + 0.5)
    # Rounding can leave a side a pixel short of the bucket; the crop must never run off the image.
    return max(resized_w, bw), max(resized_h, bh)


def _round_to_steps(value: float, steps: int) -> int:
    """Round to the nearest pixel, then down to a multiple of steps (the reference's round_to_steps)."""
    pixels = int(value + 0.5)
    return pixels - pixels % steps


def _downscaled_size(width: int, height: int, area: int, steps: int) -> tuple[int, int]:
    """Aspect-preserving size of about `area` pixels whose width or height is a multiple of steps,
    whichever of the two choices distorts the aspect ratio less once both sides are snapped."""
    ratio = width / height
    target_w = math.sqrt(area * ratio)
    target_h = area / target_w
    w_a = _round_to_steps(target_w, steps)
    h_a = _round_to_steps(w_a / ratio, steps)
    h_b = _round_to_steps(target_h, steps)
    w_b = _round_to_steps(h_b * ratio, steps)
    # A zero side means that choice is unusable (a very elongated image); never divide by it.
    err_a = abs(w_a / h_a - ratio) if h_a else math.inf
    err_b = abs(w_b / h_b - ratio) if h_b else math.inf
    if err_a < err_b:
        return w_a, int(w_a / ratio + 0.5)
    return int(h_b * ratio + 0.5), h_b


def no_upscale_bucket(width: int, height: int, spec: BucketSpec) -> tuple[tuple[int, int], tuple[int, int]]:
    """(bucket, resized) for bucket_no_upscale: shrink only images larger than the max area, then crop
    (never pad) down to multiples of bucket_reso_steps."""
    check_spec(spec)
    _check_size(width, height)
    steps = spec.bucket_reso_steps
    area = spec.resolution[0] * spec.resolution[1]
    if width * height > area:
        resized = _downscaled_size(width, height, area, steps)
    else:
        resized = (width, height)
    bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
    if bucket[0] == 0 or bucket[1] == 0:
        raise BucketError(
            f"image {width}x{height} (resized {resized[0]}x{resized[1]}) has a side smaller than "
            f"bucket_reso_steps={steps}; remove it or lower bucket_reso_steps"
        )
    return bucket, resized


def plan_resize(width: int, height: int, spec: BucketSpec, buckets: list[tuple[int, int]] | None = None) -> ResizePlan:
    """Bucket, scaled size and centre crop for one image. `buckets` defaults to make_buckets(spec);
    pass it in to avoid rebuilding it per image. bucket_no_upscale ignores it (per-image buckets)."""
    check_spec(spec)
    _check_size(width, height)
    if spec.enable_bucket and spec.bucket_no_upscale:
        bucket, resized = no_upscale_bucket(width, height, spec)
    else:
        bucket = select_bucket(width, height, buckets if buckets is not None else make_buckets(spec))
        resized = cover_size(width, height, bucket)
    return ResizePlan(
        bucket=bucket,
        resized=resized,
        crop_left=(resized[0] - bucket[0]) // 2,
        crop_top=(resized[1] - bucket[1]) // 2,
        upscale=resized[0] * resized[1] > width * height,
    )


def _check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise BucketError(f"image size {width}x{height}: both sides must be positive")
