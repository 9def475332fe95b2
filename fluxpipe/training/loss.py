"""The flow-matching loss every training method shares (spec §4): the batch's random draws, the noisy latents,
the DiT's velocity prediction and its loss against noise - x0. The maths itself lives in fluxpipe.maths.flow."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fluxpipe.maths import flow
from fluxpipe.maths.kontext import kontext_forward, reference_tokens
from fluxpipe.maths.packing import image_ids, pack_latents, text_ids


@dataclass(frozen=True, kw_only=True, slots=True)
class FlowSettings:
    """The training-maths flags (spec §4), names as the reference's."""

    timestep_sampling: str = "flux_shift"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    model_prediction_type: str = "raw"
    guidance_scale: float = 1.0
    loss_type: str = "l2"
    huber_schedule: str = "constant"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    apply_t5_attn_mask: bool = False


def draw_flow_noise(batch: dict, m: FlowSettings, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A batch's random draws, in order (spec §4.2): timesteps t [B], noise, and the noise that makes x_t
    (``--ip_noise_gamma`` perturbed, else the noise itself)."""
    x0 = batch["latents"]
    bsz, _, h, w = x0.shape
    t = flow.sample_timesteps(
        m.timestep_sampling,
        bsz,
        (h // 2) * (w // 2),
        gen,
        sigmoid_scale=m.sigmoid_scale,
        discrete_flow_shift=m.discrete_flow_shift,
        weighting_scheme=m.weighting_scheme,
        logit_mean=m.logit_mean,
        logit_std=m.logit_std,
        mode_scale=m.mode_scale,
    ).to(x0.device)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
    perturbed = (
        flow.ip_noise(noise, m.ip_noise_gamma, gen, random_strength=m.ip_noise_gamma_random_strength)
        if m.ip_noise_gamma
        else noise
    )
    return t, noise, perturbed


def flow_loss(
    dit: torch.nn.Module,
    batch: dict,
    m: FlowSettings,
    gen: torch.Generator,
    rows: list[int] | None = None,
    network: Any = None,  # the LoRA network (differential output preservation needs its base prediction)
) -> torch.Tensor:
    """Mean loss of one batch: ``draw_flow_noise``, then ``prediction_loss``. With ``rows`` (a data-parallel
    rank's share) every draw is still made for the whole batch, then only those rows compute."""
    draws = draw_flow_noise(batch, m, gen)
    if rows is not None:
        batch, draws = select_rows(batch, draws, rows)
    t, noise, perturbed = draws
    return prediction_loss(dit, batch, m, t, noise, perturbed, network=network).mean()


def select_rows(batch: dict, draws: tuple[torch.Tensor, ...], rows: list[int]) -> tuple[dict, tuple]:
    """A data-parallel rank's rows of a batch and of its random draws."""
    index = torch.tensor(rows, dtype=torch.long)
    return (
        {k: v[index.to(v.device)] if isinstance(v, torch.Tensor) else v for k, v in batch.items()},
        tuple(d[index.to(d.device)] for d in draws),
    )


def prediction_loss(
    dit: torch.nn.Module,
    batch: dict,
    m: FlowSettings,
    t: torch.Tensor,
    noise: torch.Tensor,
    perturbed: torch.Tensor | None = None,
    network: Any = None,
) -> torch.Tensor:
    """Per-item loss [B] at timesteps ``t``: x_t from ``perturbed`` noise (default ``noise``), velocity prediction
    against noise - x0 (the validation loss calls this with fixed t and noise), masked by the batch's
    ``loss_mask`` and weighted by its ``loss_weights`` (``weighted_loss``); rows marked ``preserve`` train toward
    the base model's prediction (``network`` at multiplier 0: differential output preservation). A Kontext batch's ``reference``
    latents join the sequence un-noised (``fluxpipe.maths.kontext``); the loss is on the target tokens only."""
    x0 = batch["latents"]
    bsz, _, h, w = x0.shape
    device, dtype = x0.device, x0.dtype
    x_t = flow.noisy_latents(x0, noise if perturbed is None else perturbed, t.to(dtype))
    img = pack_latents(x_t)
    txt = batch["t5"]
    reference = reference_tokens(batch["reference"]) if "reference" in batch else None  # Kontext: loss on targets
    forward = functools.partial(
        kontext_forward,
        dit,
        img,
        image_ids(bsz, h, w, device=device, dtype=dtype),
        reference,
        txt=txt,
        txt_ids=text_ids(bsz, txt.shape[1], device=device, dtype=dtype),
        timesteps=t.to(dtype),
        y=batch["pooled"],
        guidance=torch.full((bsz,), m.guidance_scale, device=device, dtype=dtype),
        txt_attention_mask=batch["t5_mask"] if m.apply_t5_attn_mask else None,
    )
    pred = flow.apply_prediction_type(forward().float(), img.float(), t, m.model_prediction_type)
    target = pack_latents(flow.velocity_target(x0, noise)).float()
    if network is not None and batch.get("preserve") is not None and bool(batch["preserve"].any()):
        base = base_prediction(network, forward)
        base = flow.apply_prediction_type(base.float(), img.float(), t, m.model_prediction_type)
        target = preserved_targets(target, base, batch["preserve"])
    weighting = flow.loss_weighting(m.weighting_scheme, t) if m.model_prediction_type == "sigma_scaled" else None
    c = (
        flow.huber_c(m.huber_schedule, m.huber_c, t, huber_scale=m.huber_scale)
        if m.loss_type in ("huber", "smooth_l1")
        else None
    )
    mask = packed_mask(batch["loss_mask"]) if batch.get("loss_mask") is not None else None
    loss = flow.loss(pred, target, m.loss_type, c, weighting=weighting, mask=mask)
    return weighted_loss(loss, None, batch.get("loss_weights"))


def base_prediction(network: Any, forward: Callable[[], torch.Tensor]) -> torch.Tensor:  # noqa: ANN401
    """The base model's prediction (LoRA multiplier 0, no gradient) for differential output preservation."""
    multiplier = network.multiplier
    network.set_multiplier(0.0)
    try:
        with torch.no_grad():
            return forward()
    finally:
        network.set_multiplier(multiplier)


def preserved_targets(target: torch.Tensor, base: torch.Tensor, preserve: torch.Tensor) -> torch.Tensor:
    """Differential output preservation (spec §4.5): the rows of a subset with custom_attributes
    diff_output_preservation = true train towards the base model's processed prediction instead of noise - x0."""
    rows = preserve.bool().to(target.device).reshape(-1, *([1] * (target.dim() - 1)))
    return torch.where(rows, base.to(target.dtype), target)


def weighted_loss(per_element: Tensor, mask: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
    """[B, ...] element-wise loss -> [B]: x ``mask`` (broadcast against it), mean over all but the batch
    dimension, x ``weights`` [B] (``prior_loss_weight`` for regularisation images, else 1; spec §4.5)."""
    loss = per_element if mask is None else per_element * mask.to(per_element.dtype)
    loss = loss.reshape(loss.shape[0], -1).mean(dim=1)
    return loss if weights is None else loss * weights.to(loss.dtype)


def packed_mask(mask: Tensor, channels: int = 16) -> Tensor:
    """A latent-grid mask [B, h, w] laid out like the packed loss [B, h/2*w/2, channels*4]: every channel of a
    latent pixel gets that pixel's value."""
    return pack_latents(mask[:, None].expand(-1, channels, -1, -1).contiguous())
