"""Kontext sampling: `fluxpipe sample --reference-image` and the Sampler's reference tokens.

One Euler step of the Sampler with a reference equals the official formula computed by the naive float64
reference (tests/test_kontext_reference.py): x1 = noise + (0 - 1) · pred(noise ⊕ reference), the reference
latent 0.3611 · (AE posterior mean − 0.1159) of the reference image resized to the sample (``target``) or to
the nearest Kontext resolution (the official default).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import REPO
from PIL import Image

from fluxpipe.cli import main
from fluxpipe.data.prompts import SamplePrompt
from fluxpipe.inference.sampler import Conditioning, Sampler
from fluxpipe.maths.sampling import get_noise
from fluxpipe.tools.demo import CLIP_DIR, FILES, T5_DIR
from tests.test_flux_reference import AXES, L_TXT, make_model, reference_flux, rel
from tests.test_kontext_reference import naive_ids, naive_pack

torch.set_num_threads(1)
EDGE = REPO / "config/demo/conditioning/cat.png"
OTHER = REPO / "config/demo/conditioning/brick.png"


def demo_ae(demo: Path) -> torch.nn.Module:
    from fluxpipe.io.checkpoints import load_model

    return load_model(demo / FILES["ae"], "ae", dtype=torch.float32, device="cpu")


def test_one_step_with_a_reference_equals_the_official_formula(demo_dir: Path) -> None:
    from fluxpipe.data.images import load_rgb, to_tensor

    model, ae = make_model(guidance_embed=True), demo_ae(demo_dir)
    g = torch.Generator().manual_seed(2)
    cond = Conditioning(
        torch.randn(1, L_TXT, 24, generator=g).double(),
        torch.randn(1, 16, generator=g).double(),
        torch.ones(1, L_TXT, dtype=torch.long),
    )
    p = SamplePrompt(index=0, prompt="x", width=64, height=64, steps=1, guidance=2.5, reference_image=EDGE)
    sampler = Sampler(model, ae, device="cpu", dtype=torch.float64, reference_size="target")
    got = sampler.latents(p, cond, None, seed=7)
    with torch.no_grad():
        image = to_tensor(load_rgb(EDGE).resize((64, 64), Image.Resampling.LANCZOS))[None]
        ref = 0.3611 * (ae.encoder(image).chunk(2, dim=1)[0].double() - 0.1159)
    noise = get_noise(1, 64, 64, 7, "cpu", torch.float64)
    seq = torch.cat([naive_pack(noise), naive_pack(ref)], 1)
    ids = torch.cat([naive_ids(1, 4, 4, 0.0), naive_ids(1, 4, 4, 1.0)], 1)
    pred = reference_flux(
        model.state_dict(),
        AXES,
        10_000,
        seq,
        ids,
        cond.txt,
        torch.zeros(1, L_TXT, 3).double(),
        torch.tensor([1.0]).double(),
        cond.vec,
        torch.tensor([2.5]).double(),
    )[:, :16]
    expected = naive_pack(noise) - pred  # t: 1 -> 0
    assert rel(naive_pack(got.double()), expected) < 1e-6  # (the Sampler returns its latent in float32)
    plain = sampler.latents(
        SamplePrompt(index=0, prompt="x", width=64, height=64, steps=1, guidance=2.5), cond, None, seed=7
    )
    other = sampler.latents(
        SamplePrompt(index=0, prompt="x", width=64, height=64, steps=1, guidance=2.5, reference_image=OTHER),
        cond,
        None,
        seed=7,
    )
    assert rel(plain, got) > 1e-3 and rel(other, got) > 1e-3  # the reference image is used


def test_the_official_reference_size_is_the_nearest_kontext_resolution(demo_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.new("RGB", (300, 200), (10, 200, 30)).save(path)  # 1.5 -> 1248 x 832 (1.5 exactly)
    sampler = Sampler(make_model(guidance_embed=True), demo_ae(demo_dir), device="cpu", dtype=torch.float64)
    tokens, ids = sampler.reference(SamplePrompt(index=0, prompt="x", reference_image=path))
    assert tokens.shape == (1, (832 // 16) * (1248 // 16), 64)
    assert ids[..., 0].unique().tolist() == [1.0]
    assert ids[0, -1].tolist() == [1.0, 832 / 16 - 1, 1248 / 16 - 1]


def test_sample_cli_uses_the_reference_image(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "models:\n"
        + "".join(f"  {k}: {demo_dir / FILES[k]}\n" for k in ("flux", "ae", "clip_l", "t5xxl"))
        + f"  clip_tokenizer: {demo_dir / CLIP_DIR}\n  t5_tokenizer: {demo_dir / T5_DIR}\n"
    )
    base = [
        "sample",
        "--config",
        str(config),
        "--prompt",
        "a cat",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--reference-size",
        "target",
    ]
    outs = []
    for name, ref in (("a", EDGE), ("b", EDGE), ("c", OTHER)):
        out = tmp_path / f"{name}.png"
        assert main([*base, "--reference-image", str(ref), "--out", str(out)]) == 0
        with Image.open(out) as im:
            outs.append(im.tobytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]
    assert main([*base, "--reference-image", str(tmp_path / "none.png"), "--out", str(tmp_path / "d.png")]) == 2
    assert "no such reference image" in capsys.readouterr().err
