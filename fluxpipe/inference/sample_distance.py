"""How far a checkpoint's samples moved toward the training data: a CLIP-free image distance.

Every image (sample or training image) is reduced to a THUMB x THUMB RGB thumbnail in [0, 1] (box filter,
aspect ignored); the distance of two images is the RMS difference of their thumbnails (0: equal, 1: black vs
white). A checkpoint's number is the mean, over its samples, of the distance to the nearest training image:
it falls as the samples come to look like the training data. Cheap, model-free, and as meaningful for the
1024 px images of real models (colour and layout) as for the demo's tiny world.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fluxpipe.data.images import load_rgb

THUMB = 32


def thumbnail(image: Image.Image, size: int = THUMB) -> Tensor:
    """[3·size·size] float32 in [0, 1]: the image as RGB, box-resized to size x size."""
    small = image.convert("RGB").resize((size, size), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).permute(2, 0, 1).reshape(-1)


def nearest_distance(samples: Tensor, references: Tensor) -> Tensor:
    """[M] RMS distance of each sample thumbnail [M, D] to its nearest reference thumbnail [N, D]."""
    squared = ((samples[:, None, :] - references[None, :, :]) ** 2).mean(dim=2)
    return squared.min(dim=1).values.sqrt()


def mean_nearest_distance(samples: Sequence[Image.Image], references: Tensor) -> float:
    """Mean over ``samples`` of the distance to the nearest of ``references`` [N, D] (thumbnails)."""
    return float(nearest_distance(torch.stack([thumbnail(s) for s in samples]), references).mean())


def training_thumbnails(manifest: Path) -> Tensor | None:
    """[N, D] thumbnails of the manifest's training images (split 'train'); None when there are none."""
    import pandas as pd

    table = pd.read_parquet(manifest, columns=["path", "split"])
    paths = [Path(p) for p in table.loc[table["split"] == "train", "path"]]
    if not paths:
        return None
    return torch.stack([thumbnail(load_rgb(p)) for p in paths])
