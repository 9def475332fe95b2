"""What --model_type changes for the trainer's flags: the DiT file's loader slot, and Chroma's requirements."""

from __future__ import annotations

import argparse

from fluxpipe.errors import FluxpipeError

CHROMA_URL = "https://huggingface.co/lodestones/Chroma"  # modelspec.implementation of Chroma LoRAs (spec §5.7)


def check_chroma(ns: argparse.Namespace, method: str) -> None:
    """--model_type chroma (spec §7.3): LoRA training only, no CLIP-L, the T5 mask on, guidance 0."""
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


def dit_variant(ns: argparse.Namespace) -> str:
    """The DiT's variant (dev / schnell / chroma), its file checked strictly as the --model_type's model."""
    from fluxpipe.io.checkpoints import dit_slot, inspect_checkpoint

    slot = dit_slot(ns.model_type)
    return str(inspect_checkpoint(ns.pretrained_model_name_or_path, slot).describe()["variant"])
