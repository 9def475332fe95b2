"""The official sampler's public names (``fluxpipe.maths.sampling``), where the shared conformance check imports them."""

from fluxpipe.maths.sampling import denoise, get_schedule

__all__ = ["denoise", "get_schedule"]
