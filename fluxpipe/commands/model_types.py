"""What --model_type changes for the trainer's flags: the DiT file's loader slot, and Chroma's requirements."""

from __future__ import annotations

import argparse


CHROMA_URL = "https://huggingface.co/lodestones/Chroma"  # modelspec.implementation of Chroma LoRAs (spec §5.7)


def dit_variant(ns: argparse.Namespace) -> str:
    """The DiT's variant (dev / schnell / chroma), its file checked strictly as the --model_type's model."""
    from fluxpipe.io.checkpoints import dit_slot, inspect_checkpoint

    slot = dit_slot(ns.model_type)
    return str(inspect_checkpoint(ns.pretrained_model_name_or_path, slot).describe()["variant"])
