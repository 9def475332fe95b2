"""fluxpipe: FLUX.1 training (LoRA, full fine-tune, ControlNet) as a resumable Snakemake pipeline."""

__version__ = "0.1.0"
