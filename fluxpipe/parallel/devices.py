"""Device and compute-dtype choices shared by the stages (torch imported on use: the CLI imports this)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_device(setting: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; anything else as given."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def encode_dtype(device: str) -> torch.dtype:
    """Frozen-encoder compute dtype: bf16 on a GPU (the reference's default), fp32 on the CPU (exact, and
    fast enough for the demo sizes; fp16 matmuls are unusably slow on CPUs)."""
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32
