"""The pipeline demo's dataset (config/demo/flags): what tools/make_demo_concept.py writes, and the config using it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

FLAGS = REPO / "config/demo/flags"


def tool():  # tools/ is not a package
    spec = importlib.util.spec_from_file_location("make_demo_concept", REPO / "tools/make_demo_concept.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_flags_are_what_the_tool_writes(tmp_path: Path) -> None:
    written = tool().write(tmp_path)
    assert len(written) == 6
    for kind in ("images", "conditioning"):
        names = sorted(p.name for p in (tmp_path / kind).iterdir())
        assert names == sorted(p.name for p in (FLAGS / kind).iterdir()), kind
        for name in names:
            assert (tmp_path / kind / name).read_bytes() == (FLAGS / kind / name).read_bytes(), name


def test_a_flag_is_four_bands_of_its_caption_colours() -> None:
    with Image.open(FLAGS / "images/red_white_flag.png") as img:
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.shape == (64, 64, 3)
    red, white = (220, 30, 30), (245, 245, 245)
    for band, colour in enumerate((red, white, red, white)):  # rows 0-15 red, 16-31 white, ...
        assert (pixels[16 * band : 16 * (band + 1)] == colour).all(), band
    assert (FLAGS / "images/red_white_flag.txt").read_text() == "a red and white striped flag\n"


def test_the_pipeline_demo_trains_on_the_flags_with_the_trained_models(monkeypatch: pytest.MonkeyPatch) -> None:
    from fluxpipe.config.pipeline import load_pipeline_file

    monkeypatch.chdir(REPO)  # the config's paths are relative to the repository root
    cfg = load_pipeline_file(REPO / "config/config.yaml")
    datasets = cfg.datasets()
    assert datasets is not None
    (dataset,) = datasets.datasets
    (subset,) = dataset.subsets
    assert subset.image_dir == "config/demo/flags/images" and subset.conditioning_data_dir
    assert cfg.evaluate.width == cfg.evaluate.height == 64 and cfg.evaluate.guidance == 1.0
    assert cfg.cache.t5xxl_max_token_length == 32  # the demo DiT's training length
    assert "demo-models --trained" in (REPO / "rules/models.smk").read_text()
