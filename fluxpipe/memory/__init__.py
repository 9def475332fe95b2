"""Memory modes: block swap, fp8 base weights, offloaded activation checkpointing."""
