"""`fluxpipe demo-models --trained`: the committed tiny DiT and AE, strict-loading, and prompt-following samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fluxpipe.cli import main
from fluxpipe.tools.demo import CLIP_DIR, DEMO_WEIGHTS, FILES, T5_DIR, write_demo_models

PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}  # the world's colours (tools/train_demo_models.py)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    assert main(["demo-models", str(out), "--trained"]) == 0
    return out


def test_trained_files_are_the_committed_ones_and_load_strictly(trained: Path) -> None:
    for slot in ("flux", "ae"):
        assert (trained / FILES[slot]).read_bytes() == (DEMO_WEIGHTS / FILES[slot]).read_bytes()
    assert (
        main(
            [
                "validate",
                "--flux",
                str(trained / FILES["flux"]),
                "--ae",
                str(trained / FILES["ae"]),
                "--clip-l",
                str(trained / FILES["clip_l"]),
                "--t5xxl",
                str(trained / FILES["t5xxl"]),
            ]
        )
        == 0
    )
    with pytest.raises(ValueError, match="seed 0"):
        write_demo_models(trained / "other", seed=1, trained=True)


def colour_shares(image: np.ndarray) -> dict[str, float]:
    """Fraction of the pixels nearest to each palette colour."""
    names = list(PALETTE)
    centres = np.array([PALETTE[n] for n in names], dtype=np.float32)
    nearest = ((image.reshape(-1, 1, 3).astype(np.float32) - centres[None]) ** 2).sum(-1).argmin(1)
    return {n: float((nearest == i).mean()) for i, n in enumerate(names)}


@pytest.mark.parametrize(
    ("shape", "colour", "background"),
    [("circle", "red", "white"), ("square", "blue", "yellow"), ("circle", "yellow", "red")],
)
def test_samples_follow_the_prompt_colours(trained: Path, shape: str, colour: str, background: str) -> None:
    from fluxpipe.data.prompts import SamplePrompt
    from fluxpipe.inference.sampler import ModelFiles, encode_texts, load_sampler

    files = ModelFiles(
        flux=trained / FILES["flux"],
        ae=trained / FILES["ae"],
        clip_l=trained / FILES["clip_l"],
        t5xxl=trained / FILES["t5xxl"],
        clip_tokenizer=trained / CLIP_DIR,
        t5_tokenizer=trained / T5_DIR,
    )
    text = f"a {colour} {shape} on a {background} background"
    cond = encode_texts(files, [text], device="cpu", dtype=torch.float32, max_length=32, apply_t5_attn_mask=False)[text]
    sampler = load_sampler(files, device="cpu", dtype=torch.float32)
    for seed in (0, 1):
        image = np.asarray(
            sampler.image(
                SamplePrompt(index=0, prompt=text, width=64, height=64, steps=20, guidance=1.0), cond, None, seed
            )
        )
        shares = colour_shares(image)
        top_two = sorted(shares, key=shares.get, reverse=True)[:2]
        assert top_two == [background, colour], (seed, shares)  # background most, then the shape's colour
        assert shares[colour] > 0.1, (seed, shares)
