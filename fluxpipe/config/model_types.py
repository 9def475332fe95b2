"""What --model_type chroma requires of the trainer's flags (spec §7.3): one rule for the standalone command
(``fluxpipe.commands.train_flags``) and for config.yaml's training sections (``fluxpipe.config.pipeline``)."""

from __future__ import annotations

import argparse

from fluxpipe.errors import FluxpipeError


def check_chroma(ns: argparse.Namespace, method: str) -> None:
    """--model_type chroma: LoRA training only, no CLIP-L, the T5 mask on, guidance 0."""
    if ns.model_type != "chroma":
        return
    problems = [
        (method != "lora", f"only LoRA training supports Chroma (not `train {method}`); use `fluxpipe train lora`"),
        (bool(ns.clip_l), f"--clip_l {ns.clip_l}: Chroma uses no CLIP-L text encoder; leave --clip_l out"),
        (not ns.apply_t5_attn_mask, "Chroma needs the T5 attention mask: add --apply_t5_attn_mask"),
        (
            ns.guidance_scale != 0.0,
            f"--guidance_scale {ns.guidance_scale}: Chroma trains with 0; pass --guidance_scale 0",
        ),
        (ns.cpu_offload_checkpointing, "--cpu_offload_checkpointing is not supported for Chroma; leave it out"),
    ]
    for bad, text in problems:
        if bad:
            raise FluxpipeError(f"--model_type chroma: {text}")
