"""Data-parallel training through torch.distributed (launched by ``torchrun``): who does what. DDP for LoRA and
ControlNet (``wrap``), FSDP2 for the full fine-tune (``fluxpipe.parallel.fsdp``); the batch logic below is shared.

Every process builds the same global batch (the epoch order and every random draw come from the same seeded
generator on every rank) and computes the loss of its own rows of it; DDP averages the gradients. So N
processes with per-process batch b train exactly the run of one process with batch N·b, the data position of a
state does not depend on the world size, and a run can resume with another number of processes. Only rank 0
writes files. The backend is NCCL on GPUs and gloo on CPUs (tested here with 2 CPU processes). NCCL has no CPU
collectives: every collective of the project goes through ``World``, on ``World.device`` (the rank's GPU under NCCL),
and the logged loss is reduced once per optimizer step, without a host sync before the one that logs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where this rank's collectives run: its GPU under NCCL, the CPU under gloo

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> list[int]:
        """This rank's rows of a global batch of ``n`` items: contiguous, as even as possible (a short batch
        at an epoch's end may leave a rank none)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return list(range(start, start + base + (self.rank < extra)))

    def part(self, n: int) -> tuple[list[int] | None, float]:
        """This rank's rows of a global batch of ``n`` (None: one process, every row) and the weight of its mean
        loss: DDP and FSDP average the ranks' gradients, so a rank's mean counts by its share of the batch."""
        if self.size == 1:
            return None, 1.0
        rows = self.rows(n)
        return rows, self.size * len(rows) / n

    def barrier(self) -> None:
        if self.size == 1:
            return
        if self.device.startswith("cuda"):  # NCCL's barrier runs on a GPU: name this rank's (else it guesses)
            dist.barrier(device_ids=[torch.device(self.device).index])
        else:
            dist.barrier()

    def mean(self, value: torch.Tensor, weight: int) -> torch.Tensor:
        """The global mean of per-rank means ``value`` over ``weight`` rows each (0 when no rank had rows), a
        0-dim tensor on ``device`` (float64 when reduced): no host sync here, ``float()`` it where it is logged."""
        if self.size == 1:
            return value.detach()
        mean = value.detach().to(self.device, torch.float64).reshape(())
        pair = torch.stack([mean * weight, torch.full_like(mean, weight)])
        dist.all_reduce(pair)
        return pair[0] / pair[1].clamp_min(1.0)  # (weights are whole rows: the clamp only turns 0 / 0 into 0)


def world() -> World:
    """The process's place in the launch (torchrun's environment), the process group started if needed."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = collective_device("nccl" if torch.cuda.is_available() else "gloo", local_rank)
    if not dist.is_initialized():
        if device.startswith("cuda"):  # before the group: NCCL and FSDP2 place each rank on its current device
            torch.cuda.set_device(local_rank)
            dist.init_process_group(backend="nccl", device_id=torch.device(device))
        else:
            dist.init_process_group(backend="gloo")
    else:
        device = collective_device(dist.get_backend(), local_rank)
    return World(rank=dist.get_rank(), size=size, local_rank=local_rank, device=device)


def collective_device(backend: str, local_rank: int) -> str:
    """Where a backend's collectives run: NCCL only on the rank's GPU, gloo (and any other) on the CPU."""
    return f"cuda:{local_rank}" if backend == "nccl" else "cpu"


def device_for(w: World, device: str) -> str:
    """Each process its own GPU."""
    return f"cuda:{w.local_rank}" if device.startswith("cuda") and w.size > 1 else device


def wrap(module: torch.nn.Module, w: World) -> torch.nn.Module:
    """DDP around the module that computes the loss (unused parameters allowed: a LoRA's module dropout, or a
    rank with no rows in a short batch)."""
    if w.size == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [w.local_rank] if torch.cuda.is_available() else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
