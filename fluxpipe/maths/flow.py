"""Rectified-flow training maths for FLUX.1 (spec §4.2-4.5): timestep sampling, noising, target, loss.

One time convention (conventions §3.4): t in [0, 1], t = 1 is pure noise, x_t = (1-t)·x0 + t·ε and the
target is the velocity ε - x0. The reference's ×1000 "timesteps" never appear here; where the reference
formula is written in ×1000 units (the `sigma` table, the exponential Huber schedule) it is converted.
Random modes are split into a draw (`torch.Generator`) and a pure `transform_*` function of the draw.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fluxpipe.maths.sampling import get_lin_function, time_shift

NUM_TRAIN_TIMESTEPS = 1000
TIMESTEP_SAMPLING_MODES = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform")
PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, ..., 1] with like.ndim dims, for broadcasting against [B, ...]."""
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def _draw(
    kind: str, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str | None
) -> Tensor:
    """float32 U[0,1) ("rand") or N(0,1) ("randn") drawn on the generator's device, then moved to ``device``."""
    where = generator.device if generator is not None else torch.device("cpu")
    fn = torch.rand if kind == "rand" else torch.randn
    return fn(shape, generator=generator, device=where, dtype=torch.float32).to(device)


# ---- pure transforms of the drawn noise (each [B] -> [B]) -------------------------------------------------


def transform_sigmoid(z: Tensor, sigmoid_scale: float = 1.0) -> Tensor:
    """`sigmoid`: t = sigmoid(s·z), z ~ N(0,1) of shape [B]."""
    return torch.sigmoid(sigmoid_scale * z)


def transform_shift(u: Tensor, discrete_flow_shift: float = 3.0) -> Tensor:
    """`shift`: t = k·u / (1 + (k-1)·u) for u in [0,1] of shape [B] (k > 1 moves t towards noise)."""
    k = discrete_flow_shift
    return (u * k) / (1 + (k - 1) * u)


def flux_shift_mu(image_seq_len: int) -> float:
    """mu = 0.5 + (1.15 - 0.5)·(N - 256)/(4096 - 256) for N packed image tokens (1.15 at 1024², 0.5 at 256²)."""
    return get_lin_function(x1=256, y1=0.5, x2=4096, y2=1.15)(image_seq_len)


def transform_flux_shift(u: Tensor, image_seq_len: int) -> Tensor:
    """`flux_shift`: t = e^mu / (e^mu + (1/u - 1)) with mu = flux_shift_mu(N); u in [0,1] of shape [B]."""
    return time_shift(flux_shift_mu(image_seq_len), 1.0, u)


def transform_logit_normal(z: Tensor, logit_mean: float = 0.0, logit_std: float = 1.0) -> Tensor:
    """`logit_normal` density: u = sigmoid(mean + std·z), z ~ N(0,1) of shape [B]."""
    return torch.sigmoid(logit_mean + logit_std * z)


def transform_mode(u: Tensor, mode_scale: float = 1.29) -> Tensor:
    """`mode` density (SD3): u' = 1 - u - s·(cos²(π·u/2) - 1 + u), u ~ U[0,1) of shape [B]."""
    return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)


def sigma_table(discrete_flow_shift: float = 3.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """[1000] float32 shifted sigmas of FlowMatchEulerDiscreteScheduler, descending from 1.

    s_i = (1000 - i)/1000 for i = 0..999, sigma_i = k·s_i / (1 + (k-1)·s_i); sigma_0 = 1, sigma_999 > 0.
    """
    steps = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float32)
    return transform_shift(steps / num_train_timesteps, discrete_flow_shift)


def transform_sigma_table(u: Tensor, discrete_flow_shift: float = 3.0) -> Tensor:
    """`sigma`: t = sigma_table[floor(u·1000)] for u of shape [B] (quantised to the 1000-entry table).

    The index is clamped to [0, 999]; the reference would raise (u = 1) or wrap around (u < -0.001),
    which only the `mode` density with u = 0 or an extreme mode_scale can produce.
    """
    table = sigma_table(discrete_flow_shift).to(u.device)
    index = torch.floor(u.float() * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
    return table[index]


# ---- timestep sampling ------------------------------------------------------------------------------------


def sample_density(
    weighting_scheme: str,
    batch: int,
    generator: torch.Generator | None,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    device: torch.device | str | None = None,
) -> Tensor:
    """[B] u of `compute_density_for_timestep_sampling`: logit_normal, mode, else (any other scheme) U[0,1)."""
    _choice("weighting_scheme", weighting_scheme, WEIGHTING_SCHEMES)
    if weighting_scheme == "logit_normal":
        return transform_logit_normal(_draw("randn", (batch,), generator, device), logit_mean, logit_std)
    u = _draw("rand", (batch,), generator, device)
    return transform_mode(u, mode_scale) if weighting_scheme == "mode" else u


def sample_timesteps(
    mode: str,
    batch: int,
    image_seq_len: int,
    generator: torch.Generator | None,
    *,
    sigmoid_scale: float = 1.0,
    discrete_flow_shift: float = 3.0,
    weighting_scheme: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    device: torch.device | str | None = None,
) -> Tensor:
    """Per-sample t in [0, 1] (1 = noise), float32 of shape [B], for ``--timestep_sampling`` ``mode``.

    - uniform: t ~ U[0,1).
    - sigmoid: t = sigmoid(s·z), z ~ N(0,1), s = sigmoid_scale.
    - shift: u = sigmoid(s·z); t = k·u/(1 + (k-1)·u), k = discrete_flow_shift.
    - flux_shift: u = sigmoid(s·z); t = e^mu/(e^mu + 1/u - 1), mu linear in image_seq_len (0.5 @ 256, 1.15 @ 4096).
    - sigma (reference default): u from `weighting_scheme` (logit_normal: sigmoid(N(logit_mean, logit_std));
      mode: the SD3 mode density with mode_scale; anything else: U[0,1)), then t = sigma_table(k)[floor(1000·u)],
      i.e. t is **quantised** to the 1000 shifted sigmas of FlowMatchEulerDiscreteScheduler (so t >= ~k/1000 > 0).
      discrete_flow_shift applies here too (spec §4.2, §14.3). sigmoid_scale is ignored in uniform/sigma modes.
    ``image_seq_len`` (packed image tokens, see packing.num_image_tokens) is only read by flux_shift.
    """
    _choice("timestep_sampling", mode, TIMESTEP_SAMPLING_MODES)
    if mode == "uniform":
        return _draw("rand", (batch,), generator, device)
    if mode == "sigma":
        u = sample_density(
            weighting_scheme,
            batch,
            generator,
            logit_mean=logit_mean,
            logit_std=logit_std,
            mode_scale=mode_scale,
            device=device,
        )
        return transform_sigma_table(u, discrete_flow_shift)
    u = transform_sigmoid(_draw("randn", (batch,), generator, device), sigmoid_scale)
    if mode == "shift":
        return transform_shift(u, discrete_flow_shift)
    if mode == "flux_shift":
        return transform_flux_shift(u, image_seq_len)
    return u


# ---- noising, target, prediction types --------------------------------------------------------------------


def noisy_latents(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t)·x0 + t·noise; x0, noise [B, ...], t [B] broadcast over the rest (type-promoted result)."""
    t = _per_sample(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """Flow-matching target v = noise - x0, same shape [B, ...]; used for every prediction type (spec §4.4)."""
    return noise - x0


def ip_noise(
    noise: Tensor, gamma: float, generator: torch.Generator | None, *, random_strength: bool = False
) -> Tensor:
    """Input-perturbation noise ε + γ'·ξ, ξ ~ N(0,I) of noise's shape [B, ...]; use in place of ε in x_t only.

    γ' = gamma, or (random_strength) one U[0,1)·gamma for the whole batch (reference: `torch.rand(1)`),
    drawn after ξ. gamma = 0 returns ``noise`` unchanged (no draw). The target keeps the plain ε.
    """
    if gamma < 0:
        raise ValueError(f"ip_noise gamma must be >= 0, got {gamma}")
    if gamma == 0:
        return noise
    xi = _draw("randn", tuple(noise.shape), generator, noise.device).to(noise.dtype)
    strength: Tensor | float = gamma
    if random_strength:
        strength = _draw("rand", (1,), generator, noise.device).to(noise.dtype) * gamma
    return noise + strength * xi


def apply_prediction_type(pred: Tensor, noisy: Tensor, t: Tensor, kind: str) -> Tensor:
    """The prediction compared with the target, per ``--model_prediction_type`` (spec §4.4).

    pred, noisy [B, ...], t [B]. raw: pred; additive: pred + noisy; sigma_scaled: pred·(-t) + noisy
    (an x0 estimate, compared with a velocity target by the reference: only `raw` is consistent, §14.2).
    sigma_scaled is the only kind the reference pairs with `loss_weighting`.
    """
    _choice("model_prediction_type", kind, PREDICTION_TYPES)
    if kind == "additive":
        return pred + noisy
    if kind == "sigma_scaled":
        return pred * (-_per_sample(t, pred)) + noisy
    return pred


def loss_weighting(weighting_scheme: str, t: Tensor) -> Tensor:
    """[B] per-sample loss weight of compute_loss_weighting_for_sd3 (applied for sigma_scaled only).

    sigma_sqrt: t^-2 (inf at t = 0); cosmap: 2 / (π·(1 - 2t + 2t²)); every other scheme: 1.
    """
    _choice("weighting_scheme", weighting_scheme, WEIGHTING_SCHEMES)
    if weighting_scheme == "sigma_sqrt":
        return (t**-2.0).float()
    if weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * t + 2 * t**2))
    return torch.ones_like(t)


# ---- loss -------------------------------------------------------------------------------------------------


def huber_c(schedule: str, base_c: float, t: Tensor, *, huber_scale: float = 1.0) -> Tensor:
    """[B] float32 Huber threshold c per sample for t [B] (spec §4.5, defaults base_c 0.1, scale 1.0).

    constant: c = base_c·huber_scale. exponential: c = huber_scale·base_c^t, which is the reference's
    huber_scale·exp(-(-ln base_c / 1000)·timestep) with its timestep = 1000·t (c = scale at data,
    base_c·scale at noise). snr: NotImplementedError, as in the reference (no alphas_cumprod for FLUX).
    """
    _choice("huber_schedule", schedule, HUBER_SCHEDULES)
    t = t.float()
    if schedule == "snr":
        raise NotImplementedError(
            "huber_schedule 'snr' needs alphas_cumprod, which FLUX lacks: use constant/exponential"
        )
    if schedule == "constant":
        return torch.full_like(t, base_c * huber_scale)
    if base_c <= 0:
        raise ValueError(f"exponential huber schedule needs huber_c > 0, got {base_c}")
    return huber_scale * torch.exp(math.log(base_c) * t)


def elementwise_loss(pred: Tensor, target: Tensor, loss_type: str, c: Tensor | float | None = None) -> Tensor:
    """Unreduced fp32 loss, shape [B, ...] of pred/target; c is a float or [B] (huber/smooth_l1 only).

    l2: (p-y)²; l1: |p-y|; huber: 2c·(sqrt((p-y)² + c²) - c); smooth_l1: 2·(sqrt((p-y)² + c²) - c).
    """
    _choice("loss_type", loss_type, LOSS_TYPES)
    diff = pred.float() - target.float()
    if loss_type == "l2":
        return diff**2
    if loss_type == "l1":
        return diff.abs()
    if c is None:
        raise ValueError(f"loss_type {loss_type!r} needs a Huber threshold c (see huber_c)")
    if isinstance(c, Tensor):
        c = _per_sample(c.float().to(diff.device), diff)
    soft = torch.sqrt(diff**2 + c**2) - c
    return 2 * c * soft if loss_type == "huber" else 2 * soft


def loss(
    pred: Tensor,
    target: Tensor,
    loss_type: str,
    c: Tensor | float | None = None,
    *,
    weighting: Tensor | None = None,
    mask: Tensor | None = None,
    dims: tuple[int, ...] | None = None,
) -> Tensor:
    """Per-sample loss [B] for pred/target [B, ...] in the reference's order (spec §4.5).

    elementwise loss (fp32) × weighting [B] (sigma_scaled only) × mask (broadcastable to pred, e.g.
    [B, 1, H, W] in [0, 1], no renormalisation) -> mean over ``dims`` (default: all but the batch dim).
    Per-sample prior-loss weights and the batch mean are left to the caller.
    """
    out = elementwise_loss(pred, target, loss_type, c)
    if weighting is not None:
        out = out * _per_sample(weighting.float().to(out.device), out)
    if mask is not None:
        out = out * mask.float().to(out.device)
    return out.mean(dim=dims if dims is not None else tuple(range(1, out.ndim)))
