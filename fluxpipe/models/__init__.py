"""FLUX.1 models with the official attribute names (DiT, autoencoder) and the text encoders."""

from fluxpipe.models.autoencoder import AutoEncoder, AutoEncoderParams
from fluxpipe.models.flux import PRESETS, Flux, FluxParams

__all__ = ["AutoEncoder", "AutoEncoderParams", "Flux", "FluxParams", "PRESETS"]
