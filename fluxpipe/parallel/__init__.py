"""Devices and data parallelism: the process group, DDP/FSDP wrapping."""
