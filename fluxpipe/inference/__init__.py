"""The sampler (official FLUX.1 denoising with LoRA/ControlNet/Kontext) and the report's images and metrics."""
