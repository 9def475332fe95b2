"""Flow-matching training maths against hand-computed values (spec §4.2-4.5)."""

from __future__ import annotations

import math

import pytest
import torch

from fluxpipe.maths import flow


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---- pure transforms ------------------------------------------------------------------------------------


def test_transform_sigmoid() -> None:
    z = torch.tensor([0.0, math.log(3.0), math.log(3.0) / 2])
    assert flow.transform_sigmoid(z[:2], 1.0).tolist() == pytest.approx([0.5, 0.75])
    assert flow.transform_sigmoid(z[2:], 2.0).tolist() == pytest.approx([0.75])


def test_transform_shift() -> None:
    u = torch.tensor([0.0, 0.5, 0.25, 1.0])
    # k=3: 3u / (1 + 2u)
    assert flow.transform_shift(u, 3.0).tolist() == pytest.approx([0.0, 0.75, 0.5, 1.0])
    assert flow.transform_shift(u, 1.0).tolist() == pytest.approx(u.tolist())


def test_flux_shift_mu_and_transform() -> None:
    assert flow.flux_shift_mu(4096) == pytest.approx(1.15)
    assert flow.flux_shift_mu(256) == pytest.approx(0.5)
    assert flow.flux_shift_mu(1024) == pytest.approx(0.63)
    u = torch.tensor([0.25, 0.5])
    e = math.exp(1.15)
    expected = [e / (e + (1 / 0.25 - 1)), e / (e + 1)]  # 0.5 -> 0.7595...
    assert flow.transform_flux_shift(u, 4096).tolist() == pytest.approx(expected, abs=1e-6)
    # flux_shift == shift with k = e^mu
    assert flow.transform_shift(u, e).tolist() == pytest.approx(expected, abs=1e-6)


def test_transform_logit_normal() -> None:
    z = torch.tensor([1.0, 0.0])
    assert flow.transform_logit_normal(z, 0.5, 2.0).tolist() == pytest.approx([sigmoid(2.5), sigmoid(0.5)])


def test_transform_mode() -> None:
    u = torch.tensor([0.25, 0.5, 0.0])
    cos2 = (1 + math.sqrt(2) / 2) / 2  # cos²(π/8)
    expected = [1 - 0.25 - 1.29 * (cos2 - 1 + 0.25), 0.5, 1.0]
    assert flow.transform_mode(u, 1.29).tolist() == pytest.approx(expected, abs=1e-6)
    assert flow.transform_mode(u, 0.0).tolist() == pytest.approx([0.75, 0.5, 1.0])


def test_sigma_table_and_quantisation() -> None:
    table = flow.sigma_table(3.0)
    assert table.shape == (1000,) and table.dtype == torch.float32
    assert table[0].item() == 1.0
    assert table[500].item() == pytest.approx(0.75)  # s = 0.5
    assert table[999].item() == pytest.approx(0.003 / 1.002)  # s = 0.001
    u = torch.tensor([0.0, 0.5, 0.2505, 0.9999, 1.0])
    # floor(1000u) = 0, 500, 250 (s=0.75 -> 2.25/2.5 = 0.9), 999, 1000 clamped to 999
    expected = [1.0, 0.75, 0.9, 0.003 / 1.002, 0.003 / 1.002]
    assert flow.transform_sigma_table(u, 3.0).tolist() == pytest.approx(expected, abs=1e-6)


# ---- sample_timesteps -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", flow.TIMESTEP_SAMPLING_MODES)
def test_sample_timesteps_shape_range_reproducible(mode: str) -> None:
    t = flow.sample_timesteps(mode, 64, 4096, gen(1))
    assert t.shape == (64,) and t.dtype == torch.float32
    assert bool(((t >= 0) & (t <= 1)).all())
    assert torch.equal(t, flow.sample_timesteps(mode, 64, 4096, gen(1)))
    assert not torch.equal(t, flow.sample_timesteps(mode, 64, 4096, gen(2)))


def test_sample_timesteps_matches_hand_pipeline() -> None:
    z = torch.randn(8, generator=gen(3)).tolist()
    u = [sigmoid(2.0 * v) for v in z]
    shift = flow.sample_timesteps("shift", 8, 0, gen(3), sigmoid_scale=2.0, discrete_flow_shift=3.0)
    assert shift.tolist() == pytest.approx([3 * x / (1 + 2 * x) for x in u], abs=1e-6)
    mu = 0.5 + 0.65 * (1024 - 256) / 3840
    fs = flow.sample_timesteps("flux_shift", 8, 1024, gen(3), sigmoid_scale=2.0)
    assert fs.tolist() == pytest.approx([math.exp(mu) / (math.exp(mu) + 1 / x - 1) for x in u], abs=1e-6)
    sig = flow.sample_timesteps("sigmoid", 8, 0, gen(3), sigmoid_scale=2.0)
    assert sig.tolist() == pytest.approx(u, abs=1e-6)
    uni = flow.sample_timesteps("uniform", 8, 0, gen(3))
    assert uni.tolist() == pytest.approx(torch.rand(8, generator=gen(3)).tolist())


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode", "sigma_sqrt"])
def test_sigma_mode_values_lie_on_the_table(scheme: str) -> None:
    k = 2.0
    t = flow.sample_timesteps("sigma", 256, 4096, gen(4), discrete_flow_shift=k, weighting_scheme=scheme)
    s = t / (k - (k - 1) * t)  # invert sigma = k s / (1 + (k-1) s)
    steps = s * 1000
    assert torch.allclose(steps, steps.round(), atol=2e-3)
    assert bool(((steps.round() >= 1) & (steps.round() <= 1000)).all())


def test_sigma_mode_logit_normal_by_hand() -> None:
    z = torch.randn(6, generator=gen(5)).tolist()
    idx = [math.floor(1000 * sigmoid(0.3 + 0.5 * v)) for v in z]
    expected = [3 * (1000 - i) / 1000 / (1 + 2 * (1000 - i) / 1000) for i in idx]
    t = flow.sample_timesteps("sigma", 6, 0, gen(5), weighting_scheme="logit_normal", logit_mean=0.3, logit_std=0.5)
    assert t.tolist() == pytest.approx(expected, abs=1e-6)


def test_sigma_mode_mode_density_by_hand() -> None:
    u = torch.rand(6, generator=gen(10)).tolist()
    u2 = [1 - x - 1.29 * (math.cos(math.pi * x / 2) ** 2 - 1 + x) for x in u]
    s = [(1000 - math.floor(1000 * x)) / 1000 for x in u2]
    t = flow.sample_timesteps("sigma", 6, 0, gen(10), weighting_scheme="mode", mode_scale=1.29)
    assert t.tolist() == pytest.approx([3 * x / (1 + 2 * x) for x in s], abs=1e-6)


def test_sampling_statistics() -> None:
    # sigma mode, uniform density, k=3: E[3s/(1+2s)] over s ~ U(0,1) = 1.5 - 0.75 ln 3 = 0.6760
    t = flow.sample_timesteps("sigma", 20000, 4096, gen(6))
    assert t.mean().item() == pytest.approx(1.5 - 0.75 * math.log(3), abs=0.01)
    # flux_shift at 4096 tokens: median maps u = 0.5 to e^1.15/(e^1.15 + 1) = 0.7595
    t = flow.sample_timesteps("flux_shift", 20000, 4096, gen(7))
    assert t.median().item() == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1), abs=0.01)
    t = flow.sample_timesteps("uniform", 20000, 4096, gen(8))
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)


def test_unknown_mode_and_scheme() -> None:
    with pytest.raises(ValueError, match="sigma, uniform, sigmoid, shift, flux_shift"):
        flow.sample_timesteps("logit_normal", 2, 4096, gen())
    with pytest.raises(ValueError, match="weighting_scheme"):
        flow.sample_timesteps("sigma", 2, 4096, gen(), weighting_scheme="lognorm")


# ---- noising, target, prediction types --------------------------------------------------------------------


def test_noisy_latents_and_target() -> None:
    x0 = torch.full((3, 2, 1, 1), 2.0)
    noise = torch.full((3, 2, 1, 1), -1.0)
    t = torch.tensor([0.0, 0.25, 1.0])
    x_t = flow.noisy_latents(x0, noise, t)
    assert x_t[:, 0, 0, 0].tolist() == [2.0, 1.25, -1.0]  # 0.75*2 + 0.25*(-1) = 1.25
    assert flow.velocity_target(x0, noise).unique().tolist() == [-3.0]


def test_prediction_types() -> None:
    pred = torch.full((2, 3), 4.0)
    noisy = torch.full((2, 3), 1.25)
    t = torch.tensor([0.25, 0.5])
    assert flow.apply_prediction_type(pred, noisy, t, "raw").unique().tolist() == [4.0]
    assert flow.apply_prediction_type(pred, noisy, t, "additive").unique().tolist() == [5.25]
    scaled = flow.apply_prediction_type(pred, noisy, t, "sigma_scaled")
    assert scaled[:, 0].tolist() == [0.25, -0.75]  # 1.25 - 0.25*4, 1.25 - 0.5*4
    with pytest.raises(ValueError, match="raw, additive, sigma_scaled"):
        flow.apply_prediction_type(pred, noisy, t, "x0")


def test_loss_weighting() -> None:
    t = torch.tensor([0.5, 0.25, 0.0])
    assert flow.loss_weighting("sigma_sqrt", t[:2]).tolist() == [4.0, 16.0]
    expected = [2 / (math.pi * 0.5), 2 / (math.pi * (1 - 0.5 + 0.125)), 2 / math.pi]
    assert flow.loss_weighting("cosmap", t).tolist() == pytest.approx(expected)
    for scheme in ("none", "uniform", "logit_normal", "mode"):
        assert flow.loss_weighting(scheme, t).tolist() == [1.0, 1.0, 1.0]


def test_ip_noise() -> None:
    noise = torch.ones(2, 3)
    assert flow.ip_noise(noise, 0.0, gen(9)) is noise
    xi = torch.randn(2, 3, generator=gen(9))
    assert torch.allclose(flow.ip_noise(noise, 0.5, gen(9)), 1 + 0.5 * xi)
    g = gen(9)
    xi, r = torch.randn(2, 3, generator=g), torch.rand(1, generator=g).item()
    assert torch.allclose(flow.ip_noise(noise, 0.5, gen(9), random_strength=True), 1 + 0.5 * r * xi)
    with pytest.raises(ValueError):
        flow.ip_noise(noise, -0.1, gen())


# ---- loss ---------------------------------------------------------------------------------------------------


def test_elementwise_losses_by_hand() -> None:
    p, y = torch.tensor([[3.0]]), torch.tensor([[0.0]])
    assert flow.elementwise_loss(p, y, "l2").item() == 9.0
    assert flow.elementwise_loss(p, y, "l1").item() == 3.0
    assert flow.elementwise_loss(p, y, "huber", 1.0).item() == pytest.approx(2 * (math.sqrt(10) - 1))
    assert flow.elementwise_loss(p, y, "smooth_l1", 0.5).item() == pytest.approx(2 * (math.sqrt(9.25) - 0.5))
    with pytest.raises(ValueError, match="Huber threshold"):
        flow.elementwise_loss(p, y, "huber")
    with pytest.raises(ValueError, match="l2, l1, huber, smooth_l1"):
        flow.elementwise_loss(p, y, "mse")


def test_per_sample_loss_reduction_weighting_mask() -> None:
    pred = torch.tensor([[[[1.0, 3.0]]], [[[3.0, 3.0]]]], dtype=torch.bfloat16)  # [2, 1, 1, 2]
    target = torch.zeros(2, 1, 1, 2)
    out = flow.loss(pred, target, "l2")
    assert out.dtype == torch.float32 and out.tolist() == [5.0, 9.0]
    c = torch.tensor([1.0, 2.0])  # per-sample threshold
    huber = flow.loss(pred, target, "huber", c)
    assert huber.tolist() == pytest.approx(
        [(2 * (math.sqrt(2) - 1) + 2 * (math.sqrt(10) - 1)) / 2, 4 * (math.sqrt(13) - 2)]
    )
    mask = torch.tensor([[[[1.0, 0.0]]], [[[0.5, 0.5]]]])
    out = flow.loss(pred, target, "l1", weighting=torch.tensor([2.0, 10.0]), mask=mask)
    assert out.tolist() == pytest.approx([(2 * 1) / 2, 10 * (1.5 + 1.5) / 2])


def test_huber_c_schedules() -> None:
    t = torch.tensor([0.0, 0.5, 1.0])
    assert flow.huber_c("constant", 0.1, t, huber_scale=2.0).tolist() == pytest.approx([0.2] * 3)
    # reference: scale * exp(-(-ln 0.1 / 1000) * 1000 t) = scale * 0.1^t
    assert flow.huber_c("exponential", 0.1, t).tolist() == pytest.approx([1.0, math.sqrt(0.1), 0.1])
    assert flow.huber_c("exponential", 0.1, t, huber_scale=3.0).tolist() == pytest.approx(
        [3.0, 3 * math.sqrt(0.1), 0.3]
    )
    with pytest.raises(NotImplementedError, match="snr"):
        flow.huber_c("snr", 0.1, t)
    with pytest.raises(ValueError, match="constant, exponential"):
        flow.huber_c("linear", 0.1, t)
