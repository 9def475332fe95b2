"""The official FLUX.1 sampler: the shifted time schedule and the Euler denoising loop.

``get_schedule`` and ``denoise`` follow the official sampling code exactly (t = 1 is noise,
t = 0 is data; the velocity points from data to noise, so each Euler step adds (t_prev - t) * v).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fluxpipe.maths.kontext import kontext_forward


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    """Resolution-dependent shift: exp(mu) / (exp(mu) + (1/t - 1)^sigma); maps 1 -> 1 and 0 -> 0."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_lin_function(x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15) -> Callable[[float], float]:
    """The line through (x1, y1) and (x2, y2): mu as a function of the image token count."""
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def get_schedule(
    num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15, shift: bool = True
) -> list[float]:
    """num_steps + 1 times from 1 to 0, shifted towards 1 for larger images (when ``shift``)."""
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        mu = get_lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
        timesteps = time_shift(mu, 1.0, timesteps)
    return timesteps.tolist()


def euler_step(img: Tensor, pred: Tensor, t_curr: float, t_prev: float) -> Tensor:
    """One flow-matching Euler step from t_curr to t_prev."""
    return img + (t_prev - t_curr) * pred


def get_noise(
    num_samples: int, height: int, width: int, seed: int, device: torch.device | str, dtype: torch.dtype
) -> Tensor:
    """The official initial noise: [B, 16, 2⌈H/16⌉, 2⌈W/16⌉] for a H x W image, drawn in float32 on the CPU
    from ``seed`` and then moved, so a seed gives the same noise (and image) on any device."""
    gen = torch.Generator("cpu").manual_seed(seed)
    shape = (num_samples, 16, 2 * math.ceil(height / 16), 2 * math.ceil(width / 16))
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def cfg_combine(v_neg: Tensor, v_pos: Tensor, scale: float) -> Tensor:
    """True classifier-free guidance: v_neg + scale · (v_pos − v_neg)."""
    return v_neg + scale * (v_pos - v_neg)


def denoise(
    model: torch.nn.Module,
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    vec: Tensor,
    timesteps: list[float],
    guidance: float = 4.0,
    *,
    txt_mask: Tensor | None = None,
    negative: tuple[Tensor, Tensor, Tensor | None] | None = None,
    cfg_scale: float = 1.0,
    reference: tuple[Tensor, Tensor] | None = None,
    on_step: Callable[[], object] | None = None,
) -> Tensor:
    """Integrate the model's velocity over ``timesteps`` (packed latents [B, N, 64] in and out).

    ``reference`` = (tokens, ids) of a Kontext reference image (``fluxpipe.maths.kontext.reference_tokens``): appended
    to the image sequence at every step, the prediction sliced back to the N target tokens.

    ``negative`` = (txt, vec, txt_mask) of a negative prompt turns on true CFG at ``cfg_scale`` (≠ 1): the
    negative and positive conditions run as one batch [neg; pos] and combine with ``cfg_combine``.
    ``on_step`` is called after each step.
    """
    batch = img.shape[0]
    cfg = negative is not None and cfg_scale != 1.0
    if cfg and negative is not None:
        n_txt, n_vec, n_mask = negative
        txt, vec, txt_ids = torch.cat((n_txt, txt)), torch.cat((n_vec, vec)), torch.cat((txt_ids, txt_ids))
        if txt_mask is not None or n_mask is not None:
            ones = torch.ones(batch, txt.shape[1], dtype=torch.int64, device=txt.device)
            txt_mask = torch.cat((ones if n_mask is None else n_mask, ones if txt_mask is None else txt_mask))
        img_ids = torch.cat((img_ids, img_ids))
        if reference is not None and reference[0].shape[0] != 1:  # (a batch-1 reference serves every row)
            reference = (torch.cat((reference[0], reference[0])), torch.cat((reference[1], reference[1])))
    rows = 2 * batch if cfg else batch
    guidance_vec = torch.full((rows,), guidance, device=img.device, dtype=img.dtype)
    for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:], strict=True):
        t_vec = torch.full((rows,), t_curr, dtype=img.dtype, device=img.device)
        x = torch.cat((img, img)) if cfg else img
        kwargs = {} if txt_mask is None else {"txt_attention_mask": txt_mask}
        pred = kontext_forward(
            model,
            x,
            img_ids,
            reference,
            txt=txt,
            txt_ids=txt_ids,
            y=vec,
            timesteps=t_vec,
            guidance=guidance_vec,
            **kwargs,
        )
        if cfg:
            pred = cfg_combine(pred[:batch], pred[batch:], cfg_scale)
        img = euler_step(img, pred, t_curr, t_prev)
        if on_step is not None:  # (a progress bar)
            on_step()
    return img
