"""Kontext conformance: fluxpipe's Kontext forward and denoise step against an independent naive reference.

The reference is the official BFL Kontext formulas, written here from its sampling module's description
(``prepare_kontext`` and ``denoise`` with ``img_cond_seq`` / ``img_cond_seq_ids``), not from fluxpipe's code:
the reference latent is packed like the target ("b c (h ph) (w pw) -> b (h w) (c ph pw)"), its ids are the
target grid's ids with the first axis set to 1, it is concatenated after the target along the sequence
(ids too), the FLUX forward runs on the joint sequence (the float64 naive FLUX of test_flux_reference) and
the prediction is sliced back to the target tokens; one Euler step is img + (t_prev - t_curr) * pred.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fluxpipe.maths.kontext import kontext_forward, kontext_resolution, reference_ids, reference_tokens
from fluxpipe.maths.packing import image_ids
from fluxpipe.maths.sampling import denoise
from tests.test_flux_reference import AXES, L_TXT, TOL, make_model, reference_flux, rel

torch.set_num_threads(1)


def naive_pack(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C], feature c*4 + ph*2 + pw, by explicit loops."""
    b, c, h, w = x.shape
    out = torch.empty(b, (h // 2) * (w // 2), 4 * c, dtype=x.dtype)
    for r in range(h // 2):
        for col in range(w // 2):
            for ch in range(c):
                for ph in range(2):
                    for pw in range(2):
                        out[:, r * (w // 2) + col, ch * 4 + ph * 2 + pw] = x[:, ch, 2 * r + ph, 2 * col + pw]
    return out


def naive_ids(batch: int, rows: int, cols: int, first: float) -> Tensor:
    ids = torch.tensor([[first, r, c] for r in range(rows) for c in range(cols)], dtype=torch.float64)
    return ids[None].repeat(batch, 1, 1)


def case(seed: int = 3) -> dict[str, Tensor]:
    """A tiny Kontext case: a 4x4 latent target (4 tokens), a 4x6 reference latent (6 tokens), batch 2."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(
        img=r(2, 4, 64),
        ref_latent=r(2, 16, 4, 6),
        txt=r(2, L_TXT, 24),
        txt_ids=torch.zeros(2, L_TXT, 3, dtype=torch.float64),
        y=r(2, 16),
        timesteps=torch.tensor([0.8, 0.3], dtype=torch.float64),
        guidance=torch.tensor([2.5, 2.5], dtype=torch.float64),
    )


def official_forward(sd: dict, c: dict) -> Tensor:
    img_ids = naive_ids(2, 2, 2, 0.0)
    cond, cond_ids = naive_pack(c["ref_latent"]), naive_ids(2, 2, 3, 1.0)
    out = reference_flux(
        sd,
        AXES,
        10_000,
        torch.cat([c["img"], cond], 1),
        torch.cat([img_ids, cond_ids], 1),
        c["txt"],
        c["txt_ids"],
        c["timesteps"],
        c["y"],
        c["guidance"],
    )
    return out[:, : c["img"].shape[1]]


def test_reference_ids_and_tokens_follow_the_official_layout() -> None:
    lat = torch.randn(2, 16, 4, 6, dtype=torch.float64)
    tokens, ids = reference_tokens(lat)
    assert torch.equal(tokens, naive_pack(lat))
    assert torch.equal(ids, naive_ids(2, 2, 3, 1.0))
    assert reference_ids(1, 4, 4).tolist() == [[[1, 0, 0], [1, 0, 1], [1, 1, 0], [1, 1, 1]]]


def test_kontext_forward_matches_official_formula() -> None:
    model, c = make_model(guidance_embed=True), case()
    expected = official_forward(model.state_dict(), c)
    with torch.no_grad():
        got = kontext_forward(
            model,
            c["img"],
            image_ids(2, 4, 4, dtype=torch.float64),
            reference_tokens(c["ref_latent"]),
            txt=c["txt"],
            txt_ids=c["txt_ids"],
            y=c["y"],
            timesteps=c["timesteps"],
            guidance=c["guidance"],
        )
    assert got.shape == (2, 4, 64)
    assert rel(got, expected) < TOL
    # the reference tokens matter, and so does their first id axis (a 0 there is a different model input)
    plain = reference_flux(
        model.state_dict(),
        AXES,
        10_000,
        c["img"],
        naive_ids(2, 2, 2, 0.0),
        c["txt"],
        c["txt_ids"],
        c["timesteps"],
        c["y"],
        c["guidance"],
    )
    assert rel(plain, expected) > 1e-3
    sd, flat = model.state_dict(), naive_ids(2, 2, 3, 0.0)
    wrong = reference_flux(
        sd,
        AXES,
        10_000,
        torch.cat([c["img"], naive_pack(c["ref_latent"])], 1),
        torch.cat([naive_ids(2, 2, 2, 0.0), flat], 1),
        c["txt"],
        c["txt_ids"],
        c["timesteps"],
        c["y"],
        c["guidance"],
    )[:, :4]
    assert rel(wrong, expected) > 1e-4


def test_one_kontext_denoise_step_matches_official_formula() -> None:
    model, c = make_model(guidance_embed=True), case()
    t_curr, t_prev = 0.8, 0.55
    one = {k: v[:1] for k, v in c.items()}
    one["timesteps"], one["guidance"] = torch.tensor([t_curr], dtype=torch.float64), torch.tensor([2.5]).double()
    expected = one["img"] + (t_prev - t_curr) * official_forward_one(model.state_dict(), one)
    with torch.no_grad():
        got = denoise(
            model,
            one["img"],
            image_ids(1, 4, 4, dtype=torch.float64),
            one["txt"],
            one["txt_ids"],
            one["y"],
            [t_curr, t_prev],
            guidance=2.5,
            reference=reference_tokens(one["ref_latent"]),
        )
    assert rel(got, expected) < TOL


def official_forward_one(sd: dict, c: dict) -> Tensor:
    cond, cond_ids = naive_pack(c["ref_latent"]), naive_ids(1, 2, 3, 1.0)
    out = reference_flux(
        sd,
        AXES,
        10_000,
        torch.cat([c["img"], cond], 1),
        torch.cat([naive_ids(1, 2, 2, 0.0), cond_ids], 1),
        c["txt"],
        c["txt_ids"],
        c["timesteps"],
        c["y"],
        c["guidance"],
    )
    return out[:, :4]


def test_kontext_resolution_is_the_nearest_aspect_ratio() -> None:
    assert kontext_resolution(1024, 1024) == (1024, 1024)
    assert kontext_resolution(256, 256) == (1024, 1024)
    assert kontext_resolution(1920, 1080) == (1392, 752)  # 16:9 = 1.778; 1392/752 = 1.851 is nearest
    assert kontext_resolution(600, 800) == (880, 1184)  # 0.75; 880/1184 = 0.743
