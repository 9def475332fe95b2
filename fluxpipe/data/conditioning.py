"""ControlNet conditioning images: loaded at training time to match their target's cached latent.

The manifest pairs every image of a ControlNet dataset with its conditioning image (same stem, same size
with buckets; column ``conditioning``). Conditioning images are not cached as latents: the ControlNet sees
them as RGB pixels in [-1, 1] at the bucket's full resolution (spec §7.2). Each is resized to its target's
resized size with the same resampling as the target (``fluxpipe.data.images.resize_and_crop``: area when
shrinking, Lanczos when enlarging), always centre-cropped to the target's bucket (the reference supports no
random crop here), and mirrored when the target's flipped latent entry is drawn (``flip_aug``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fluxpipe.data.images import load_rgb, resize_and_crop, to_tensor
from fluxpipe.errors import FluxpipeError


def centre_crop(resized: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """(left, top) of the bucket-sized box in the middle of the resized image (the manifest's crop rule)."""
    return (resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2


def load_conditioning(
    path: Path, resized: tuple[int, int], bucket: tuple[int, int], flip: bool = False
) -> torch.Tensor:
    """The conditioning image of a target that the manifest scales to ``resized`` (W, H) and centre-crops to
    ``bucket`` (W, H): float32 [3, bucket H, bucket W] in [-1, 1], mirrored left-right when ``flip``.

    The whole conditioning image is scaled to ``resized``, so it covers the target's pixel grid: with buckets
    the manifest guarantees both have the same size (one identical resampling); without buckets a
    conditioning image of another size is stretched onto the target in one resampling.
    """
    image = load_rgb(Path(path))
    left, top = centre_crop(resized, bucket)
    x = to_tensor(resize_and_crop(image, resized, left, top, bucket))
    return x.flip(-1) if flip else x


def _pair(row: Mapping[str, Any], a: str, b: str) -> tuple[int, int]:  # row: a manifest row
    return int(row[a]), int(row[b])


class ConditioningImages:
    """The conditioning tensors of one training run, each loaded once and kept in memory.

    Entries are keyed by (path, flip) and the target's resized size and bucket (the same file may serve
    datasets with other buckets). They are stored as uint8 (4x smaller than float32) and converted back
    exactly as ``to_tensor`` converts, so ``get`` returns what ``load_conditioning`` returns.
    """

    def __init__(self) -> None:
        self._pixels: dict[tuple[str, bool, tuple[int, int, int, int]], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._pixels)

    def get(self, row: Mapping[str, object], flip: bool = False) -> torch.Tensor:
        """The conditioning tensor of a manifest row (a dict or a pandas row with ``path``, ``conditioning``,
        ``resized_w/h`` and ``bucket_w/h``): float32 [3, bucket H, bucket W] in [-1, 1], mirrored if ``flip``."""
        path = str(row.get("conditioning") or "")
        if not path:
            raise FluxpipeError(
                f"{row.get('path')}: the manifest row has no conditioning image; ControlNet "
                f"training needs conditioning_data_dir in every subset of its datasets"
            )
        resized, bucket = _pair(row, "resized_w", "resized_h"), _pair(row, "bucket_w", "bucket_h")
        key = (path, bool(flip), resized + bucket)
        if key not in self._pixels:
            x = load_conditioning(Path(path), resized, bucket, flip=bool(flip))
            self._pixels[key] = ((x + 1.0) * 127.5).round().to(torch.uint8)
        return self._pixels[key].to(torch.float32) / 127.5 - 1.0
