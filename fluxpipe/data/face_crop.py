"""Face-centred crop augmentation (``face_crop_aug_range``), as the reference trainer does it with bucketing off.

The face comes from the image's file name: ``name_cx_cy_w_h.ext``, the last four ``_``-separated tokens being
integers (face centre and size in pixels of the image as stored); a name with fewer than five tokens, or a
centre x of 0, has no face and trains as any other image. ``face_crop_plan`` is the reference's
``crop_target``: the image is scaled by a factor drawn uniformly between the scale that makes the face
``high`` times smaller than the short side of the training size and the one that makes it ``low`` times smaller
(both clamped to [the scale at which the image just covers the training size, 1]: never upscaled), then cut
around the face, rows first: centred on the face, plus with ``random_crop`` a triangular jitter of up to the
longer distance from the face to an edge (two ``randint(0, r)`` summed, minus r), else, when the range is not a
single value and the face is at least 40 px and a tenth of the short side, a jitter of ``randint(-f//20, f//20)``;
the origin is then clamped into the image. Pure arithmetic: ``fluxpipe.data.augment`` applies it to pixels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from fluxpipe.errors import FluxpipeError


@dataclass(frozen=True, kw_only=True, slots=True)
class FaceBox:
    """The face of a file name: centre (cx, cy) and size (w, h) in pixels of the stored image."""

    cx: int
    cy: int
    w: int
    h: int


@dataclass(frozen=True, kw_only=True, slots=True)
class CropPlan:
    """Where one step's image comes from: scaled to ``resized`` (W, H), cut at ``origin`` (left, top)."""

    resized: tuple[int, int]
    origin: tuple[int, int]


def face_box(path: str | Path) -> FaceBox | None:
    """The face encoded in ``path``'s stem, or None (fewer than five tokens, or centre x 0: no face).

    Raises FluxpipeError when one of the last four tokens is not an integer."""
    tokens = Path(path).stem.split("_")
    if len(tokens) < 5:
        return None
    try:
        cx, cy, w, h = (int(t) for t in tokens[-4:])
    except ValueError as e:
        raise FluxpipeError(
            f"{path}: face_crop_aug_range reads the face from the file name (NAME_CX_CY_W_H, four integers), "
            f"but {'_'.join(tokens[-4:])!r} is not four integers; rename the file or drop face_crop_aug_range"
        ) from e
    return FaceBox(cx=cx, cy=cy, w=w, h=h) if cx > 0 else None


def check_face_image(path: str | Path, size: tuple[int, int], target: tuple[int, int]) -> None:
    """Raise FluxpipeError when the image is smaller than the training size on a side (face crops never
    upscale; the reference stops with an internal error there)."""
    if size[0] < target[0] or size[1] < target[1]:
        raise FluxpipeError(
            f"{path}: {size[0]}x{size[1]} is smaller than the training size {target[0]}x{target[1]}; a face crop "
            "(face_crop_aug_range) never upscales: use a larger image, a smaller resolution, or drop the face "
            "from the file name"
        )


def face_crop_plan(
    size: tuple[int, int],
    target: tuple[int, int],
    face: FaceBox,
    aug_range: tuple[float, float],
    random_crop: bool,
    rng: random.Random,
) -> CropPlan:
    """The reference's face crop of an image of ``size`` (W, H) to ``target`` (W, H) (module docstring); draws
    from ``rng``: the scale (only when its range is not one value), then rows' jitter, then columns'."""
    if size == target:
        return CropPlan(resized=size, origin=(0, 0))
    width, height = size
    tw, th = target
    face_size = max(face.w, face.h)
    short = min(tw, th)
    cover = max(th / height, tw / width)
    low = min(1.0, max(cover, short / (face_size * aug_range[1])))
    high = min(1.0, max(low, short / (face_size * aug_range[0])))
    scale = low if low >= high else rng.uniform(low, high)
    resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    if resized[0] < tw or resized[1] < th:  # only an image smaller than the target (check_face_image)
        raise ValueError(f"face crop of a {width}x{height} image to {tw}x{th}: it would need upscaling")
    centre = (int(face.cx * scale + 0.5), int(face.cy * scale + 0.5))
    top = _origin(th, resized[1], centre[1], face_size, short, aug_range, random_crop, rng)
    left = _origin(tw, resized[0], centre[0], face_size, short, aug_range, random_crop, rng)
    return CropPlan(resized=resized, origin=(left, top))


def _origin(
    target: int,
    length: int,
    centre: int,
    face_size: int,
    short: int,
    aug_range: tuple[float, float],
    random_crop: bool,
    rng: random.Random,
) -> int:
    """One axis's crop start: centred on the face, jittered, clamped into [0, length - target]."""
    p = centre - target // 2
    if random_crop:
        reach = max(length - centre, centre)
        p += rng.randint(0, reach) + rng.randint(0, reach) - reach
    elif aug_range[0] != aug_range[1] and face_size > short // 10 and face_size >= 40:
        p += rng.randint(-face_size // 20, face_size // 20)
    return max(0, min(p, length - target))
