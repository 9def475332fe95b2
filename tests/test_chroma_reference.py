"""Independent float64 formula of the Chroma forward pass, checked against fluxpipe.models.chroma.

Written from the Chroma definition (the reference's chroma_models.py / lodestones' flow model, as described in
fluxpipe/models/chroma.py's docstring), not from fluxpipe's code: modulation vectors computed one index at a
time with an explicit loop, the approximator as plain maths over the state dict, the reference's own mask form
(the outer product m·mᵀ of the widened text mask and the image ones, which also masks padding queries; a
query with no visible key gets a zero output as torch's SDPA gives), and the naive per-head attention, RoPE,
norms and activations of tests/test_flux_reference.py. The time, guidance and index embedding arguments are
rounded to float32 as the official timestep_embedding does (and the RMSNorms compute in float32), so a float64 model is held to 1e-8.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from fluxpipe.models.chroma import Chroma, ChromaParams
from tests.test_flux_reference import gelu_tanh, grid_ids, head_rms_norm, layer_norm, lin, rel, rope_phases, rotate

torch.set_num_threads(1)

SD = dict[str, Tensor]
AXES = [4, 14, 14]
TOL = 1e-8
L_TXT = 6
CTX = 24


def emb(x: float, dim: int) -> Tensor:
    """FLUX sinusoidal embedding of one scalar: argument 1000·x, cos half first (the official float32 points:
    the frequencies, the arguments and cos/sin)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    arg = torch.tensor(1000.0 * x, dtype=torch.float32) * freqs
    return torch.cat([torch.cos(arg), torch.sin(arg)]).double()


def modulation_vectors(sd: SD, t: float, g: float, count: int) -> Tensor:
    """[count, C]: the approximator applied to [emb16(t) | emb16(g) | emb32(j)] for j = 0..count-1."""
    n_layers = len({k.split(".")[2] for k in sd if k.startswith("distilled_guidance_layer.layers.")})
    rows = []
    for j in range(count):
        x = lin(sd, "distilled_guidance_layer.in_proj", torch.cat([emb(t, 16), emb(g, 16), emb(float(j), 32)]))
        for i in range(n_layers):
            h = head_rms_norm(x, sd[f"distilled_guidance_layer.norms.{i}.scale"], True)  # float32, official
            h = lin(sd, f"distilled_guidance_layer.layers.{i}.in_layer", h)
            x = x + lin(sd, f"distilled_guidance_layer.layers.{i}.out_layer", h / (1.0 + torch.exp(-h)))
        rows.append(lin(sd, "distilled_guidance_layer.out_proj", x))
    return torch.stack(rows)


def widened(mask: Tensor) -> Tensor:
    """The reference's modify_mask_to_attend_padding(mask, L, 1), one item at a time."""
    out = mask.clone()
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        if n < mask.shape[1]:
            out[b, n] = 1
    return out


def masked_attention(q: Tensor, k: Tensor, v: Tensor, D: int, phases: Tensor, allowed: Tensor) -> Tensor:
    """Per-head attention with a [B, T, T] query x key mask; rows with no allowed key give 0."""
    heads = []
    for h in range(q.shape[-1] // D):
        sl = slice(h * D, (h + 1) * D)
        qh, kh = rotate(q[..., sl], phases, True), rotate(k[..., sl], phases, True)
        s = torch.einsum("bqd,bkd->bqk", qh, kh) / math.sqrt(D)
        s = s.masked_fill(~allowed, float("-inf"))
        top = s.max(dim=-1, keepdim=True).values
        e = torch.where(allowed, torch.exp(s - torch.where(torch.isinf(top), 0.0, top)), 0.0)
        p = e / e.sum(dim=-1, keepdim=True).clamp_min(1e-300)
        heads.append(torch.einsum("bqk,bkd->bqd", p, v[..., sl]))
    return torch.cat(heads, dim=-1)


def reference_chroma(sd: SD, inp: dict[str, Tensor], txt_mask: Tensor) -> Tensor:
    sd = {k: v.double() for k, v in sd.items()}
    C, D, L = sd["img_in.weight"].shape[0], sum(AXES), inp["txt"].shape[1]
    n_double, n_single = (len({k.split(".")[1] for k in sd if k.startswith(b)}) for b in ("double_", "single_"))
    B, N = inp["img"].shape[:2]
    count = 3 * n_single + 12 * n_double + 2
    mods = torch.stack([modulation_vectors(sd, float(inp["timesteps"][b]), 0.0, count) for b in range(B)])
    ok = torch.cat([widened(txt_mask) != 0, torch.ones(B, N, dtype=torch.bool)], dim=1)
    allowed = ok[:, :, None] & ok[:, None, :]  # the reference's m·mᵀ
    phases = rope_phases(torch.cat([inp["txt_ids"], inp["img_ids"]], dim=1), AXES, 10_000)
    xs = {"txt": lin(sd, "txt_in", inp["txt"].double()), "img": lin(sd, "img_in", inp["img"].double())}
    for i in range(n_double):
        p, q, k, v, m = f"double_blocks.{i}", [], [], [], {}
        for s, first in (("txt", 3 * n_single + 6 * n_double + 6 * i), ("img", 3 * n_single + 6 * i)):
            m[s] = [mods[:, first + r] for r in range(6)]  # shift, scale, gate (attention), then the MLP's
            qkv = lin(sd, f"{p}.{s}_attn.qkv", (1 + m[s][1][:, None]) * layer_norm(xs[s]) + m[s][0][:, None])
            q.append(head_rms_norm(qkv[..., :C], sd[f"{p}.{s}_attn.norm.query_norm.scale"], True))
            k.append(head_rms_norm(qkv[..., C : 2 * C], sd[f"{p}.{s}_attn.norm.key_norm.scale"], True))
            v.append(qkv[..., 2 * C :])
        a = masked_attention(torch.cat(q, 1), torch.cat(k, 1), torch.cat(v, 1), D, phases, allowed)
        for s, part in (("txt", a[:, :L]), ("img", a[:, L:])):
            x = xs[s] + m[s][2][:, None] * lin(sd, f"{p}.{s}_attn.proj", part)
            hid = gelu_tanh(lin(sd, f"{p}.{s}_mlp.0", (1 + m[s][4][:, None]) * layer_norm(x) + m[s][3][:, None]))
            xs[s] = x + m[s][5][:, None] * lin(sd, f"{p}.{s}_mlp.2", hid)
    x = torch.cat([xs["txt"], xs["img"]], dim=1)
    for i in range(n_single):
        p, (shift, scale, gate) = f"single_blocks.{i}", (mods[:, 3 * i + r, None] for r in range(3))
        h = lin(sd, f"{p}.linear1", (1 + scale) * layer_norm(x) + shift)
        q = head_rms_norm(h[..., :C], sd[f"{p}.norm.query_norm.scale"], True)
        k = head_rms_norm(h[..., C : 2 * C], sd[f"{p}.norm.key_norm.scale"], True)
        a = masked_attention(q, k, h[..., 2 * C : 3 * C], D, phases, allowed)
        x = x + gate * lin(sd, f"{p}.linear2", torch.cat([a, gelu_tanh(h[..., 3 * C :])], dim=-1))
    shift, scale = mods[:, count - 2, None], mods[:, count - 1, None]
    return lin(sd, "final_layer.linear", (1 + scale) * layer_norm(x[:, L:]) + shift)


def make_model(seed: int = 0) -> Chroma:
    params = ChromaParams(
        in_channels=64,
        context_in_dim=CTX,
        hidden_size=64,
        mlp_ratio=4.0,
        num_heads=2,
        depth=2,
        depth_single_blocks=2,
        axes_dim=list(AXES),
        theta=10_000,
        qkv_bias=True,
        approximator_depth=2,
        approximator_hidden_size=48,
    )
    model = Chroma(params).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.endswith(".scale"):
                t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64))
            elif t.ndim == 2:
                t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64) / math.sqrt(t.shape[1]))
            else:
                t.copy_(0.1 * torch.randn(t.shape, generator=g, dtype=torch.float64))
    return model


def make_inputs(batch: int, h: int, w: int, seed: int = 1) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        img=torch.randn(batch, h * w, 64, generator=g, dtype=torch.float64),
        img_ids=grid_ids(batch, h, w),
        txt=torch.randn(batch, L_TXT, CTX, generator=g, dtype=torch.float64),
        txt_ids=torch.zeros(batch, L_TXT, 3, dtype=torch.float64),
        timesteps=torch.rand(batch, generator=g, dtype=torch.float64),
    )


MASK = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])


def forward(model: Chroma, inp: dict[str, Tensor], mask: Tensor) -> Tensor:
    with torch.no_grad():
        return model(**inp, txt_attention_mask=mask)


def test_chroma_forward_equals_the_formula() -> None:
    model, inp = make_model(), make_inputs(2, 3, 4)
    ref = reference_chroma(model.state_dict(), inp, MASK)
    err = rel(forward(model, inp, MASK), ref)
    print(f"chroma naive-vs-model relative L2 {err:.3e}, max abs {(forward(model, inp, MASK) - ref).abs().max():.3e}")
    assert err < TOL
    assert rel(ref[0], ref[1]) > 0.1  # the items differ (timestep, mask, inputs)
    single = forward(model, {k: v[1:] for k, v in inp.items()}, MASK[1:])
    assert rel(single[0], ref[1]) < TOL  # each item sees only its own mask


def test_mask_keeps_one_padding_token_and_hides_the_rest() -> None:
    model, inp = make_model(), make_inputs(2, 3, 4)
    ref = forward(model, inp, MASK)
    pad_after_first = torch.zeros(2, L_TXT, 1, dtype=torch.float64)
    pad_after_first[0, 4:], pad_after_first[1, 5:] = 5.0, 0.0  # item 0: tokens 4, 5 are hidden; 3 is attended
    assert rel(forward(model, dict(inp, txt=inp["txt"] + pad_after_first), MASK), ref) < TOL
    first_pad = torch.zeros(2, L_TXT, 1, dtype=torch.float64)
    first_pad[0, 3] = 5.0
    assert rel(forward(model, dict(inp, txt=inp["txt"] + first_pad), MASK)[0], ref[0]) > 1e-4


def test_guidance_and_timestep_reach_the_modulations() -> None:
    model, inp = make_model(), make_inputs(1, 2, 2)
    mask = torch.ones(1, L_TXT, dtype=torch.long)
    zero = forward(model, inp, mask)
    with torch.no_grad():
        assert rel(model(**inp, guidance=torch.zeros(1, dtype=torch.float64), txt_attention_mask=mask), zero) == 0.0
        assert rel(model(**inp, guidance=torch.ones(1, dtype=torch.float64), txt_attention_mask=mask), zero) > 1e-4
    later = dict(inp, timesteps=inp["timesteps"] + 0.1)
    assert rel(forward(model, later, mask), reference_chroma(model.state_dict(), later, mask)) < TOL


def test_chroma_refuses_a_missing_mask() -> None:
    model, inp = make_model(), make_inputs(1, 2, 2)
    with pytest.raises(ValueError, match="attention mask"):
        model(**inp)


@pytest.mark.parametrize(
    "key",
    [
        "distilled_guidance_layer.norms.1.scale",
        "distilled_guidance_layer.out_proj.bias",
        "double_blocks.1.txt_attn.norm.key_norm.scale",
        "single_blocks.0.linear1.bias",
        "final_layer.linear.weight",
    ],
)
def test_formula_detects_single_weight_perturbation(key: str) -> None:
    model, inp = make_model(), make_inputs(1, 2, 3)
    mask = MASK[:1]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd[key].view(-1)[3] += 0.05
    assert rel(forward(model, inp, mask), reference_chroma(sd, inp, mask)) > 1e-7
