"""The official schedule and Euler loop, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from fluxpipe.maths.sampling import denoise, get_lin_function, get_schedule, time_shift


def test_unshifted_schedule_is_linear() -> None:
    assert get_schedule(4, 4096, shift=False) == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_mu_line_passes_through_the_official_points() -> None:
    line = get_lin_function()
    assert line(256) == pytest.approx(0.5) and line(4096) == pytest.approx(1.15)


def test_shifted_schedule_by_hand() -> None:
    # 1024 image tokens: mu = 0.5 + (1024 - 256) * 0.65 / 3840 = 0.63; t' = e^mu / (e^mu + 1/t - 1)
    mu = 0.5 + (1024 - 256) * 0.65 / 3840
    expected = [1.0] + [math.exp(mu) / (math.exp(mu) + 1 / t - 1) for t in (0.75, 0.5, 0.25)] + [0.0]
    assert get_schedule(4, 1024) == pytest.approx(expected, abs=1e-6)
    assert float(time_shift(mu, 1.0, torch.tensor(0.5))) == pytest.approx(math.exp(mu) / (math.exp(mu) + 1))


class ConstantVelocity(torch.nn.Module):
    """pred = guidance + timestep (so the test sees both arrive)."""

    def forward(self, img, img_ids, txt, txt_ids, y, timesteps, guidance):  # noqa: ANN001, ANN201
        return torch.ones_like(img) * (guidance[:, None, None] + timesteps[:, None, None])


def test_denoise_integrates_euler_steps_by_hand() -> None:
    img = torch.zeros(2, 3, 4)
    out = denoise(ConstantVelocity(), img, img, img, img, img, timesteps=[1.0, 0.5, 0.0], guidance=2.0)
    # step 1: 0 + (0.5 - 1) * (2 + 1) = -1.5 ; step 2: -1.5 + (0 - 0.5) * (2 + 0.5) = -2.75
    torch.testing.assert_close(out, torch.full((2, 3, 4), -2.75))
