"""Public import path of the official FLUX.1 sampler (``get_schedule``, ``denoise`` and friends), kept stable for
users and conformance checks; the code is in ``fluxpipe.maths.sampling``."""

from fluxpipe.maths.sampling import (
    cfg_combine,
    denoise,
    euler_step,
    get_lin_function,
    get_noise,
    get_schedule,
    time_shift,
)

__all__ = ["cfg_combine", "denoise", "euler_step", "get_lin_function", "get_noise", "get_schedule", "time_shift"]
