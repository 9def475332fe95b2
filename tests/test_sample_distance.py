"""The evaluate stage's sample-to-training-data distance (fluxpipe.inference.sample_distance), on hand-computed images."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from fluxpipe.inference.sample_distance import mean_nearest_distance, nearest_distance, thumbnail, training_thumbnails
from fluxpipe.stages.evaluate import Checkpoint, metrics


def half(width: int = 64) -> Image.Image:
    """Left half white, right half black."""
    image = Image.new("RGB", (width, width), "black")
    image.paste((255, 255, 255), (0, 0, width // 2, width))
    return image


def test_thumbnail_is_box_filtered_rgb_in_unit_range() -> None:
    t = thumbnail(half(64), size=4).reshape(3, 4, 4)
    assert torch.equal(t[:, :, :2], torch.ones(3, 4, 2)) and torch.equal(t[:, :, 2:], torch.zeros(3, 4, 2))
    assert thumbnail(Image.new("L", (10, 30), 51), size=2).tolist() == pytest.approx(
        [0.2] * 12
    )  # grey, any size, any mode


def test_distance_is_the_rms_to_the_nearest_reference() -> None:
    black, white = thumbnail(Image.new("RGB", (8, 8), "black")), thumbnail(Image.new("RGB", (8, 8), "white"))
    refs = torch.stack([black, white])
    d = nearest_distance(torch.stack([thumbnail(half(64)), black, white]), refs)
    assert d.tolist() == pytest.approx([math.sqrt(0.5), 0.0, 0.0])  # half the pixels differ by 1 from either
    assert nearest_distance(white[None], black[None]).item() == pytest.approx(1.0)
    assert mean_nearest_distance([half(64), Image.new("RGB", (8, 8), "white")], refs) == pytest.approx(
        math.sqrt(0.5) / 2
    )


def test_training_thumbnails_read_the_train_split_only(tmp_path: Path) -> None:
    Image.new("RGB", (16, 16), "white").save(tmp_path / "a.png")
    Image.new("RGB", (16, 16), "black").save(tmp_path / "b.png")
    pd.DataFrame({"path": [str(tmp_path / "a.png"), str(tmp_path / "b.png")], "split": ["train", "val"]}).to_parquet(
        tmp_path / "m.parquet"
    )
    refs = training_thumbnails(tmp_path / "m.parquet")
    assert refs.shape == (1, 3 * 32 * 32) and refs.min().item() == 1.0
    pd.DataFrame({"path": [str(tmp_path / "b.png")], "split": ["val"]}).to_parquet(tmp_path / "v.parquet")
    assert training_thumbnails(tmp_path / "v.parquet") is None


def test_metrics_carry_one_distance_per_checkpoint() -> None:
    cps = [Checkpoint("base", None, 0, 0), Checkpoint("final", Path("x.safetensors"), 10, 2)]
    out = metrics(cps, [{"step": 1, "loss": 1.0}], [], [0.5, 0.25])
    assert [c["train_distance"] for c in out["checkpoints"]] == [0.5, 0.25]
    assert [c["train_distance"] for c in metrics(cps, [], [])["checkpoints"]] == [None, None]
