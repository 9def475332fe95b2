"""--blocks_to_swap N: the last blocks of the DiT keep their Linear weights in pinned host memory.

Split as the reference (spec §6.1): ⌊N/2⌋ double blocks and (N − ⌊N/2⌋)·2 single blocks, the last ones of each
list; at least two blocks of each kind stay resident, so N ≤ 35 for FLUX.1. Only the Linear ``.weight`` tensors
move (biases, norms and the LoRA stay on the GPU). Unlike the reference, the base weights are frozen, so nothing is
ever copied back: a swapped block's weights live once in pinned host memory and are *streamed* to fresh GPU
tensors on a dedicated copy stream, one block ahead of the compute stream (the next block in execution order,
in the forward pass; the previous one while the backward pass recomputes). A swapped block always runs under
activation checkpointing, so its GPU weights are dropped when its forward (and later its backward) is done;
autograd never holds a reused buffer, and the caching allocator recycles the memory.

Trainable weights (the full fine-tune) stay in host memory too: they are copied with autograd, so their
gradients flow back into the host parameters and the optimizer updates them there (``invalidate`` after each
step drops the copies made before it).

The schedule is plain Python over block keys (``("double", i)`` / ``("single", j)``) and is tested on the CPU;
on a CUDA device the copies are asynchronous (``non_blocking`` from pinned memory) and ordered by events.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

BlockKey = tuple[str, int]


@dataclass(frozen=True, slots=True)
class SwapPlan:
    """Which blocks stream their weights: indices into ``double_blocks`` and ``single_blocks``."""

    double: tuple[int, ...]
    single: tuple[int, ...]

    @property
    def order(self) -> tuple[BlockKey, ...]:
        """The swapped blocks in execution order (all double blocks run before the single blocks)."""
        return tuple(("double", i) for i in self.double) + tuple(("single", j) for j in self.single)


def max_blocks_to_swap(depth: int, depth_single: int) -> int:
    """Largest N whose split leaves two blocks of each kind resident (35 for FLUX.1's 19 + 38 blocks)."""
    n = 0
    while (n + 1) // 2 <= depth - 2 and ((n + 1) - (n + 1) // 2) * 2 <= depth_single - 2:
        n += 1
    return n


def swap_plan(blocks_to_swap: int, depth: int, depth_single: int) -> SwapPlan:
    """The reference's split of N swap units: ⌊N/2⌋ double and (N − ⌊N/2⌋)·2 single blocks, the last ones."""
    limit = max_blocks_to_swap(depth, depth_single)
    if not 0 <= blocks_to_swap <= limit:
        raise ValueError(
            f"--blocks_to_swap {blocks_to_swap}: this model ({depth} double, {depth_single} single "
            f"blocks) can swap 0 to {limit} (two blocks of each kind stay on the GPU)"
        )
    n_double = blocks_to_swap // 2
    n_single = (blocks_to_swap - n_double) * 2
    return SwapPlan(tuple(range(depth - n_double, depth)), tuple(range(depth_single - n_single, depth_single)))


def prefetch_target(order: tuple[BlockKey, ...], key: BlockKey, backward: bool, keep_for_backward: bool) -> BlockKey:
    """The block whose weights to fetch while ``key`` computes; ``key`` itself means "keep these weights".

    Forward pass: the next block in execution order; after the last one, the first (for the next call), unless
    a backward pass follows, which starts with the last block: it is kept. Backward pass (the recomputes run in
    reverse order): the previous block; the first block is kept for the next step's forward pass.
    """
    pos = order.index(key)
    if backward:
        return key if pos == 0 else order[pos - 1]
    if pos == len(order) - 1:
        return key if keep_for_backward else order[0]
    return order[pos + 1]


def _swapped_weights(block: nn.Module) -> dict[str, Tensor]:
    return {f"{name}.weight": m.weight for name, m in block.named_modules() if isinstance(m, nn.Linear)}


class BlockSwapper:
    """Streams the swapped blocks' Linear weights to ``device`` one block ahead; see the module docstring."""

    def __init__(self, dit: nn.Module, blocks_to_swap: int, device: torch.device | str) -> None:
        self.device = torch.device(device)
        double, single = dit.double_blocks, dit.single_blocks
        if not isinstance(double, nn.ModuleList) or not isinstance(single, nn.ModuleList):
            raise TypeError("block swapping needs a FLUX DiT (double_blocks and single_blocks)")
        self.plan = swap_plan(blocks_to_swap, len(double), len(single))
        self.order = self.plan.order
        self.blocks = {key: getattr(dit, f"{key[0]}_blocks")[key[1]] for key in self.order}
        self.host = {key: _swapped_weights(block) for key, block in self.blocks.items()}
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._ready: dict[BlockKey, tuple[dict[str, Tensor], torch.cuda.Event | None]] = {}
        self.trace: list[tuple[str, BlockKey]] | None = None  # set to [] to record fetch/use events (tests)

    def place(self, dit: nn.Module) -> None:
        """Move everything but the swapped weights to the device; pin the swapped weights in host memory."""
        swapped = {id(p) for weights in self.host.values() for p in weights.values()}
        for module in dit.modules():
            for p in module.parameters(recurse=False):
                if id(p) in swapped:
                    p.data = p.data.to("cpu")
                    if self.cuda:
                        p.data = p.data.pin_memory()
                else:
                    p.data = p.data.to(self.device)
            for name, b in module.named_buffers(recurse=False):
                setattr(module, name, b.to(self.device))

    def invalidate(self) -> None:
        """Drop prefetched copies (call after an optimizer step changed trainable host weights)."""
        self._ready.clear()

    def host_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for w in self.host.values() for p in w.values())

    def _fetch(self, key: BlockKey) -> None:
        if key in self._ready:
            return
        if self.trace is not None:
            self.trace.append(("fetch", key))
        # a trainable weight (full fine-tune) is copied with autograd: its gradient flows back through the copy
        # into the host parameter, where the optimizer updates it
        if not self.cuda:  # a copy keeps the CPU path honest: the block computes on fetched tensors
            self._ready[key] = (
                {n: (p if p.requires_grad else p.detach()).clone() for n, p in self.host[key].items()},
                None,
            )
            return
        # no wait on the compute stream: the source is pinned host memory that never changes, and the
        # destination is fresh (record_stream in acquire keeps the allocator from reusing it too early)
        with torch.cuda.stream(self.copy_stream):
            tensors = {
                n: (p if p.requires_grad else p.detach()).to(self.device, non_blocking=True)
                for n, p in self.host[key].items()
            }
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self._ready[key] = (tensors, event)

    def acquire(self, key: BlockKey) -> dict[str, Tensor]:
        """The block's weights on the device (waiting for their transfer), and the next transfer started."""
        backward = torch._C._current_graph_task_id() != -1  # inside autograd's backward: a recompute
        self._fetch(key)
        tensors, event = self._ready.pop(key)
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for t in tensors.values():
                t.record_stream(stream)  # allocated on the copy stream, used (and freed) on the compute stream
        if self.trace is not None:
            self.trace.append(("use", key))
        target = prefetch_target(self.order, key, backward, keep_for_backward=torch.is_grad_enabled())
        if target == key:
            self._ready[key] = (tensors, None)
        else:
            self._fetch(target)
        return tensors

    def run(self, key: BlockKey, block: nn.Module, args: tuple, training: bool) -> Tensor | tuple[Tensor, ...]:
        """Call a swapped block; with gradients it runs checkpointed, so its weights are fetched again (and
        then dropped) in the backward pass."""

        def call(*inputs: Tensor | None) -> Tensor | tuple[Tensor, ...]:
            # strict=False: only the streamed Linear weights are substituted; every other tensor is the block's own
            return functional_call(block, self.acquire(key), inputs, strict=False)

        if training and torch.is_grad_enabled():
            return checkpoint(call, *args, use_reentrant=False)
        return call(*args)
