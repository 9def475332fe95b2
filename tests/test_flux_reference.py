"""Independent float64 reference of the FLUX.1 transformer forward pass, checked against fluxpipe.

The reference below is written from the FLUX.1 math (BFL's official model), not from fluxpipe's layer
code: plain functions over a state dict in the official key layout, explicit per-head attention loops,
an explicit softmax, complex-number RoPE and hand-written LayerNorm / RMSNorm / SiLU / GELU(tanh).

Precision: the official code computes the timestep-embedding arguments, the RoPE rotation and the q/k
RMSNorm in float32 even in a float64 model (the float32 timestep arguments alone cause a ~1e-5 relative
difference from exact float64 math). With official_f32=True the reference rounds to float32 at those
three points only, so a float64 model can be held to 1e-8; official_f32=False is pure float64 math.

The reference is validated against the official-code case file (case_public.safetensors), then checks
what that file does not cover: schnell (no guidance embedding), batch 2 with different items, a
non-square latent grid and a text attention mask. A sensitivity test shows one perturbed weight is seen.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from fluxpipe.models import Flux, FluxParams

torch.set_num_threads(1)

SD = dict[str, Tensor]
CASE = Path("/work/shared/conformance/case_public.safetensors")
TOL = 1e-8  # relative L2 error, float64 model vs float64 reference
AXES = [4, 14, 14]
L_TXT = 5


# ------------------------------------------------------------------------------ naive reference
def lin(sd: SD, name: str, x: Tensor) -> Tensor:
    return torch.einsum("...i,oi->...o", x, sd[f"{name}.weight"]) + sd[f"{name}.bias"]


def silu(x: Tensor) -> Tensor:
    return x / (1.0 + torch.exp(-x))


def gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def layer_norm(x: Tensor) -> Tensor:
    mu = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mu) ** 2).sum(-1, keepdim=True) / x.shape[-1]
    return (x - mu) / torch.sqrt(var + 1e-6)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return (1.0 + scale[:, None, :]) * layer_norm(x) + shift[:, None, :]


def head_rms_norm(x: Tensor, scale: Tensor, f32: bool) -> Tensor:
    """x [B, T, H*D] head-major; RMSNorm over each head's D features (in float32 if f32), times scale [D]."""
    D = scale.shape[0]
    out = torch.empty_like(x)
    for h in range(x.shape[-1] // D):
        xh = x[..., h * D : (h + 1) * D].to(torch.float32 if f32 else x.dtype)
        normed = xh * torch.rsqrt((xh * xh).mean(-1, keepdim=True) + 1e-6)  # rsqrt: official's f32 op
        out[..., h * D : (h + 1) * D] = normed.to(x.dtype) * scale
    return out


def time_embed(t: Tensor, f32: bool) -> Tensor:
    dt = torch.float32 if f32 else torch.float64
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=dt) / 128)
    arg = (1000.0 * t.double())[:, None].to(dt) * freqs[None, :]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1).double()


def mlp_embed(sd: SD, name: str, x: Tensor) -> Tensor:
    return lin(sd, f"{name}.out_layer", silu(lin(sd, f"{name}.in_layer", x)))


def rope_phases(ids: Tensor, axes_dim: list[int], theta: float) -> Tensor:
    """ids [B, T, 3] -> unit complex numbers exp(i p omega_j) [B, T, D/2], axis-0 pairs first."""
    angles = []
    for axis, d in enumerate(axes_dim):
        omega = float(theta) ** (-2.0 * torch.arange(d // 2, dtype=torch.float64) / d)
        angles.append(ids[..., axis : axis + 1].double() * omega)
    a = torch.cat(angles, dim=-1)
    return torch.polar(torch.ones_like(a), a)


def rotate(x: Tensor, phases: Tensor, f32: bool) -> Tensor:
    """x [B, T, D]: (x_2j + i x_2j+1) * exp(i p omega_j) (in complex64 if f32), back to real pairs."""
    dt, cdt = (torch.float32, torch.complex64) if f32 else (torch.float64, torch.complex128)
    z = torch.complex(x[..., 0::2].to(dt), x[..., 1::2].to(dt)) * phases.to(cdt)
    return torch.stack([z.real, z.imag], dim=-1).flatten(-2).to(x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, D: int, phases: Tensor, key_ok: Tensor | None, f32: bool) -> Tensor:
    """q, k (already RMS-normed), v: [B, T, H*D] head-major. Per-head loop, explicit softmax."""
    heads = []
    for h in range(q.shape[-1] // D):
        sl = slice(h * D, (h + 1) * D)
        qh, kh = rotate(q[..., sl], phases, f32), rotate(k[..., sl], phases, f32)
        s = torch.einsum("bqd,bkd->bqk", qh, kh) / math.sqrt(D)
        if key_ok is not None:
            s = s.masked_fill(~key_ok[:, None, :], float("-inf"))
        e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
        heads.append(torch.einsum("bqk,bkd->bqd", e / e.sum(dim=-1, keepdim=True), v[..., sl]))
    return torch.cat(heads, dim=-1)


def reference_flux(
    sd: SD,
    axes_dim: list[int],
    theta: float,
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    timesteps: Tensor,
    y: Tensor,
    guidance: Tensor | None = None,
    txt_mask: Tensor | None = None,
    official_f32: bool = True,
) -> Tensor:
    sd = {k: v.double() for k, v in sd.items()}
    C, D = sd["img_in.weight"].shape[0], sum(axes_dim)
    n_double, n_single = (len({k.split(".")[1] for k in sd if k.startswith(b)}) for b in ("double_", "single_"))
    xs, L = {"txt": lin(sd, "txt_in", txt.double()), "img": lin(sd, "img_in", img.double())}, txt.shape[1]
    vec = mlp_embed(sd, "time_in", time_embed(timesteps, official_f32))
    if "guidance_in.in_layer.weight" in sd:  # dev; schnell has no guidance embedding
        vec = vec + mlp_embed(sd, "guidance_in", time_embed(guidance, official_f32))
    sv = silu(vec + mlp_embed(sd, "vector_in", y.double()))  # every modulation reads SiLU(vec)
    phases = rope_phases(torch.cat([txt_ids, img_ids], dim=1), axes_dim, theta)
    key_ok = None if txt_mask is None else torch.cat([txt_mask != 0, torch.ones(img.shape[:2], dtype=torch.bool)], 1)
    for i in range(n_double):
        p = f"double_blocks.{i}"
        mods, q, k, v = {}, [], [], []
        for s in ("txt", "img"):  # text first in the joint sequence
            mods[s] = lin(sd, f"{p}.{s}_mod.lin", sv).split(C, dim=-1)
            qkv = lin(sd, f"{p}.{s}_attn.qkv", modulate(xs[s], mods[s][0], mods[s][1]))
            q.append(head_rms_norm(qkv[..., :C], sd[f"{p}.{s}_attn.norm.query_norm.scale"], official_f32))
            k.append(head_rms_norm(qkv[..., C : 2 * C], sd[f"{p}.{s}_attn.norm.key_norm.scale"], official_f32))
            v.append(qkv[..., 2 * C :])
        a = attention(torch.cat(q, 1), torch.cat(k, 1), torch.cat(v, 1), D, phases, key_ok, official_f32)
        for s, part in (("txt", a[:, :L]), ("img", a[:, L:])):
            _, _, g1, sh2, sc2, g2 = mods[s]
            x = xs[s] + g1[:, None] * lin(sd, f"{p}.{s}_attn.proj", part)
            hid = gelu_tanh(lin(sd, f"{p}.{s}_mlp.0", modulate(x, sh2, sc2)))
            xs[s] = x + g2[:, None] * lin(sd, f"{p}.{s}_mlp.2", hid)
    x = torch.cat([xs["txt"], xs["img"]], dim=1)
    for i in range(n_single):
        p = f"single_blocks.{i}"
        shift, scale, gate = lin(sd, f"{p}.modulation.lin", sv).split(C, dim=-1)
        h = lin(sd, f"{p}.linear1", modulate(x, shift, scale))
        q = head_rms_norm(h[..., :C], sd[f"{p}.norm.query_norm.scale"], official_f32)
        k = head_rms_norm(h[..., C : 2 * C], sd[f"{p}.norm.key_norm.scale"], official_f32)
        a = attention(q, k, h[..., 2 * C : 3 * C], D, phases, key_ok, official_f32)
        x = x + gate[:, None] * lin(sd, f"{p}.linear2", torch.cat([a, gelu_tanh(h[..., 3 * C :])], dim=-1))
    shift, scale = lin(sd, "final_layer.adaLN_modulation.1", sv).chunk(2, dim=-1)
    return lin(sd, "final_layer.linear", modulate(x[:, L:], shift, scale))


# ------------------------------------------------------------------------------ test helpers
def rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def make_model(guidance_embed: bool, seed: int = 0) -> Flux:
    params = FluxParams(
        in_channels=64,
        vec_in_dim=16,
        context_in_dim=24,
        hidden_size=64,
        mlp_ratio=4.0,
        num_heads=2,
        depth=2,
        depth_single_blocks=2,
        axes_dim=list(AXES),
        theta=10_000,
        qkv_bias=True,
        guidance_embed=guidance_embed,
    )
    model = Flux(params).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.endswith(".scale"):  # RMSNorm scales: O(1) and random so attention logits matter
                t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64))
            elif t.ndim == 2:
                t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64) / math.sqrt(t.shape[1]))
            else:
                t.copy_(0.1 * torch.randn(t.shape, generator=g, dtype=torch.float64))
    return model


def grid_ids(batch: int, h: int, w: int) -> Tensor:
    """[batch, h*w, 3]: (0, row, column), flattened row-major."""
    ids = torch.zeros(h, w, 3, dtype=torch.float64)
    ids[..., 1] = torch.arange(h, dtype=torch.float64)[:, None]
    ids[..., 2] = torch.arange(w, dtype=torch.float64)[None, :]
    return ids.reshape(1, h * w, 3).repeat(batch, 1, 1)


def make_inputs(batch: int, h: int, w: int, guidance: bool, seed: int = 1) -> dict[str, Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(
        img=r(batch, h * w, 64),
        img_ids=grid_ids(batch, h, w),
        txt=r(batch, L_TXT, 24),
        txt_ids=torch.zeros(batch, L_TXT, 3, dtype=torch.float64),
        timesteps=torch.rand(batch, generator=g, dtype=torch.float64),
        y=r(batch, 16),
        guidance=(1.0 + 4.0 * torch.rand(batch, generator=g, dtype=torch.float64)) if guidance else None,
    )


def compare(model: Flux, inp: dict, mask: Tensor | None = None) -> tuple[Tensor, float]:
    with torch.no_grad():
        got = model(**inp, txt_attention_mask=mask)
    ref = reference_flux(model.state_dict(), AXES, 10_000, **inp, txt_mask=mask)
    return ref, rel(got, ref)


# ------------------------------------------------------------------------------ tests
def test_reference_reproduces_official_case_file() -> None:
    if not CASE.exists():
        pytest.skip(f"{CASE} not present")
    from safetensors import safe_open

    with safe_open(str(CASE), "pt") as f:
        fp = json.loads(f.metadata()["conformance"])["flux_params"]
        t = {k: f.get_tensor(k) for k in f.keys() if k.startswith("flux.")}
    sd = {k[len("flux.weight.") :]: v for k, v in t.items() if k.startswith("flux.weight.")}
    inp = {k[len("flux.in.") :]: v for k, v in t.items() if k.startswith("flux.in.")}
    for official_f32 in (True, False):
        ref = reference_flux(sd, fp["axes_dim"], fp["theta"], **inp, official_f32=official_f32)
        assert rel(ref, t["flux.out"]) < 1e-4


def test_schnell_no_guidance_matches_reference() -> None:
    model, inp = make_model(guidance_embed=False), make_inputs(1, 4, 4, guidance=False)
    ref, err = compare(model, inp)
    assert err < TOL
    exact = reference_flux(model.state_dict(), AXES, 10_000, **inp, official_f32=False)
    assert rel(ref, exact) < 1e-4  # the official float32 points are a small, bounded effect


def test_dev_batch2_distinct_items_matches_reference() -> None:
    model, inp = make_model(guidance_embed=True), make_inputs(2, 4, 4, guidance=True)
    ref, err = compare(model, inp)
    assert err < TOL
    assert rel(ref[0], ref[1]) > 0.1  # the two items really differ
    with torch.no_grad():  # and each item is computed independently of the other
        single = model(**{k: v[1:] for k, v in inp.items()})
    assert rel(single[0], ref[1]) < TOL


def test_non_square_grid_matches_reference() -> None:
    model, inp = make_model(guidance_embed=True), make_inputs(2, 3, 5, guidance=True)
    _, err = compare(model, inp)
    assert err < TOL
    transposed = dict(inp, img_ids=inp["img_ids"][..., [0, 2, 1]])  # rows/cols swapped must matter
    assert (
        rel(
            reference_flux(model.state_dict(), AXES, 10_000, **transposed),
            reference_flux(model.state_dict(), AXES, 10_000, **inp),
        )
        > 1e-3
    )


def test_text_attention_mask_matches_reference() -> None:
    model, inp = make_model(guidance_embed=True), make_inputs(2, 3, 5, guidance=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    ref, err = compare(model, inp, mask)
    assert err < TOL
    assert rel(ref, compare(model, inp)[0]) > 1e-3  # the mask changes the result
    noisy = dict(inp, txt=inp["txt"] + 5.0 * (mask == 0)[..., None])  # masked tokens cannot leak
    with torch.no_grad():
        assert rel(model(**noisy, txt_attention_mask=mask), ref) < TOL
    _, err_ones = compare(model, inp, torch.ones(2, L_TXT, dtype=torch.long))
    assert err_ones < TOL


@pytest.mark.parametrize(
    "key",
    [
        "double_blocks.1.txt_attn.norm.key_norm.scale",
        "single_blocks.0.linear1.bias",
        "final_layer.adaLN_modulation.1.weight",
    ],
)
def test_reference_detects_single_weight_perturbation(key: str) -> None:
    model, inp = make_model(guidance_embed=True), make_inputs(1, 3, 5, guidance=True)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd[key].view(-1)[3] += 0.05
    with torch.no_grad():
        got = model(**inp)
    assert rel(got, reference_flux(sd, AXES, 10_000, **inp)) > 1e-6
