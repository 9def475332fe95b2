"""FSDP2 for the full fine-tune across processes: each rank holds 1/N of every weight, gradient and optimizer
moment (``torch.distributed.fsdp.fully_shard`` per double and single block, then the whole DiT).

The files stay the one-process ones: model files are gathered one tensor at a time and written by rank 0; a
training state holds the full weights and the optimizer state in the one-process layout (parameter numbers,
not names), so a state resumes with any number of processes. Loading broadcasts from rank 0, which alone reads
the state's tensors. Host memory: rank 0 gathers a whole state on the CPU to save it (weights plus moments).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

if TYPE_CHECKING:  # torch.distributed.checkpoint is imported when a state is saved or loaded
    from torch.distributed.checkpoint.state_dict import DictValueType, StateDictOptions


def shard_dit(dit: nn.Module) -> nn.Module:
    """Shard the DiT in place: one FSDP unit per block (gathered just before it runs, freed after) and the rest."""
    from torch.distributed.fsdp import fully_shard

    for name in ("double_blocks", "single_blocks"):
        for block in dit.get_submodule(name).children():
            fully_shard(block)
    fully_shard(dit)
    return dit


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def reshard(module: nn.Module) -> None:
    """Back to the shards: FSDP2 keeps the root unit's parameters gathered after a forward that had no backward
    (a sample or validation loss at the end of training), and the state-dict helpers then miss them."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every rank calls it, in the same order)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _names(module: nn.Module) -> list[str]:
    """Trainable parameter names in the order the one-process optimizer numbers them."""
    return [n for n, p in module.named_parameters() if p.requires_grad]


def _options(*, cpu_offload: bool = False, broadcast_from_rank0: bool = False) -> StateDictOptions:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload, broadcast_from_rank0=broadcast_from_rank0)


def model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full weights on rank 0's CPU (the other ranks get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    reshard(module)

    # a full model state dict holds tensors only (torch types its values as any state value)
    return cast(dict[str, torch.Tensor], get_model_state_dict(module, options=_options(cpu_offload=True)))


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state on rank 0 in the one-process layout (``optimizer.state_dict()`` of an unsharded
    run); the other ranks get an empty dict."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    reshard(module)
    # {"state": {name: {...}}, "param_groups": [{..., "params": [name, ...]}]} (torch types it more generally)
    by_name = cast(dict[str, Any], get_optimizer_state_dict(module, optimizer, options=_options(cpu_offload=True)))
    if not by_name:
        return {}
    index = {n: i for i, n in enumerate(_names(module))}
    return {
        "state": {index[n]: v for n, v in by_name["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]],
    }


def load_model_state(module: nn.Module, weights: dict[str, torch.Tensor], main: bool) -> None:
    """Rank 0's full weights into every rank's shards (strict)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    state: DictValueType = dict(weights) if main else {}
    set_model_state_dict(module, state, options=_options(broadcast_from_rank0=True))


def load_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], main: bool
) -> None:
    """Rank 0's one-process optimizer state (see ``optimizer_state``) into every rank's shards."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    by_name: dict[str, Any] = {}
    if main:
        names = _names(module)
        by_name = {
            "state": {names[int(i)]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]],
        }
    set_optimizer_state_dict(module, optimizer, by_name, options=_options(broadcast_from_rank0=True))
