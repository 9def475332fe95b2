"""Chroma sampling: prompts encoded without CLIP-L, and one Euler step by hand (T5 mask on, guidance 0, the
shifted schedule, real CFG with the negative prompt)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fluxpipe.data.prompts import SamplePrompt
from fluxpipe.inference.sampler import Conditioning, ModelFiles, encode_texts, load_sampler
from fluxpipe.maths.sampling import get_noise
from fluxpipe.tools.demo import FILES, T5_DIR, write_chroma_demo

torch.set_num_threads(1)


def chroma_files(demo: Path, chroma: Path) -> ModelFiles:
    return ModelFiles(
        flux=chroma, ae=demo / FILES["ae"], clip_l=None, t5xxl=demo / FILES["t5xxl"], t5_tokenizer=demo / T5_DIR
    )


def test_prompts_encode_without_clip(demo_dir: Path, tmp_path: Path) -> None:
    files = chroma_files(demo_dir, write_chroma_demo(tmp_path))
    conds = encode_texts(
        files, ["a red cube", ""], device="cpu", dtype=torch.float32, max_length=16, apply_t5_attn_mask=True
    )
    assert conds["a red cube"].vec.shape == (1, 0)
    assert conds["a red cube"].txt.shape == (1, 16, 64)
    assert 1 < int(conds["a red cube"].mask.sum()) < 16 and int(conds[""].mask.sum()) == 1  # "" is </s> only


def test_one_chroma_step_by_hand(demo_dir: Path, tmp_path: Path) -> None:
    sampler = load_sampler(
        chroma_files(demo_dir, write_chroma_demo(tmp_path)), device="cpu", dtype=torch.float32, model_type="chroma"
    )
    g = torch.Generator().manual_seed(3)
    pos = Conditioning(torch.randn(1, 8, 64, generator=g), torch.zeros(1, 0), torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0]]))
    neg = Conditioning(torch.randn(1, 8, 64, generator=g), torch.zeros(1, 0), torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0]]))
    assert sampler.chroma and sampler.shift and sampler.apply_t5_attn_mask
    p = SamplePrompt(index=0, prompt="p", width=64, height=64, steps=1, guidance=3.5, cfg_scale=4.0)
    got = sampler.latents(p, pos, neg, seed=5)
    # by hand: 16 tokens (a 4 x 4 grid of 2 x 2 patches); the shifted time of t = 1 is 1 (exp(mu)/(exp(mu)+0))
    noise = get_noise(1, 64, 64, 5, "cpu", torch.float32)
    img = noise.reshape(1, 16, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 16, 64)
    img_ids = torch.zeros(1, 16, 3)
    img_ids[0, :, 1] = torch.arange(4).repeat_interleave(4).float()
    img_ids[0, :, 2] = torch.arange(4).repeat(4).float()
    t = torch.ones(1)
    with torch.no_grad():
        v = {
            name: sampler.dit(
                img, img_ids, c.txt, torch.zeros(1, 8, 3), t, None, torch.zeros(1), txt_attention_mask=c.mask
            )
            for name, c in (("pos", pos), ("neg", neg))
        }
    x = img + (0.0 - 1.0) * (v["neg"] + 4.0 * (v["pos"] - v["neg"]))
    expected = x.reshape(1, 4, 4, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 16, 8, 8)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    # the T5 mask is used even though apply_t5_attn_mask was not asked for, and guidance 3.5 is not fed
    with torch.no_grad():
        unmasked = sampler.dit(
            img, img_ids, pos.txt, torch.zeros(1, 8, 3), t, None, torch.zeros(1), txt_attention_mask=torch.ones(1, 8)
        )
    assert not math.isclose(float((unmasked - v["pos"]).abs().max()), 0.0, abs_tol=1e-6)
