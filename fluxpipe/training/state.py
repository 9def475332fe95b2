"""Training state on disk without pickle: weights, optimizer, scheduler, counters, RNG states, data position.

A state is a folder ``<name>-state`` holding ``tensors.safetensors`` (every tensor: trainable weights,
optimizer moments, RNG states) and ``state.json`` (everything else, plus the sha256 of the tensor file).
It is written into a temporary folder and renamed into place, so a kill at any moment leaves either the
previous state or the complete new one (its temporary, named by its writer, is removed by the next save of that
state, see ``fluxpipe.io.atomic``); ``load_state`` verifies the checksum before anything is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fluxpipe.errors import FluxpipeError
from fluxpipe.io.atomic import no_space_error, remove_stale_temps, writer_tag

STATE_VERSION = 1
TENSORS, META = "tensors.safetensors", "state.json"


@dataclass
class TrainState:
    """What a resumed run needs to continue exactly where an uninterrupted one would be."""

    step: int  # optimizer steps done
    epoch: int  # current epoch (0-based)
    batch_in_epoch: int  # batches of the current epoch already consumed
    weights: dict[str, torch.Tensor]  # trainable parameters by name
    optimizer: dict[str, Any]  # optimizer.state_dict()
    scheduler: dict[str, Any]  # lr_scheduler.state_dict()
    rng: dict[str, Any] = field(default_factory=dict)  # see capture_rng
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-able run facts (settings digest, ...)


def capture_rng(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """torch (CPU and CUDA), Python ``random`` and named generators' states."""
    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    rng.update({f"gen.{k}": g.get_state() for k, g in generators.items()})
    return rng


def restore_rng(rng: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    for k, g in generators.items():
        g.set_state(rng[f"gen.{k}"])


def _split(value: Any, prefix: str, tensors: dict[str, torch.Tensor], seen: dict[int, str] | None = None) -> Any:
    """JSON-able skeleton of ``value`` with every tensor moved into ``tensors`` under a path key. A tensor
    object met twice (8-bit optimizers share their quantisation maps) is stored once; a view into a larger
    storage is copied, since safetensors refuses shared storage."""
    seen = {} if seen is None else seen
    if isinstance(value, torch.Tensor):
        if id(value) in seen:
            return {"__tensor__": seen[id(value)]}
        tensor = value.detach().cpu()
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size() or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        tensors[prefix] = tensor
        seen[id(value)] = prefix
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        return {
            "__dict__": [
                [_split(k, f"{prefix}.k{i}", tensors, seen), _split(v, f"{prefix}.{i}", tensors, seen)]
                for i, (k, v) in enumerate(value.items())
            ]
        }
    if isinstance(value, (list, tuple)):
        items = [_split(v, f"{prefix}.{i}", tensors, seen) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a training state ({prefix})")


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors.get(value["__tensor__"])  # (None: left unread, see load_state)
        if "__tuple__" in value:
            return tuple(_join(v, tensors) for v in value["__tuple__"])
        return {_join(k, tensors): _join(v, tensors) for k, v in value["__dict__"]}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def save_state(state: TrainState, folder: Path) -> None:
    """Write ``state`` atomically into ``folder`` (replacing an older state there)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    skeleton = {
        name: _split(getattr(state, name), name, tensors, seen)
        for name in ("weights", "optimizer", "scheduler", "rng", "extra")
    }
    remove_stale_temps(folder.parent, folder.name)  # what a killed earlier save left
    tmp = folder.with_name(f".{folder.name}.{writer_tag()}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / TENSORS))
        meta = {
            "version": STATE_VERSION,
            "step": state.step,
            "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "tensors_sha256": _sha256(tmp / TENSORS),
            **skeleton,
        }
        (tmp / META).write_text(json.dumps(meta), encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = folder.with_name(f".{folder.name}.{writer_tag()}.{uuid.uuid4().hex}.old")
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (full := no_space_error(e, folder)) is not None:
            raise full from None
        raise


def _tensor_names(value: Any, names: set[str]) -> set[str]:
    if isinstance(value, dict):
        if "__tensor__" in value:
            names.add(value["__tensor__"])
        for v in value.values():
            _tensor_names(v, names)
    elif isinstance(value, list):
        for v in value:
            _tensor_names(v, names)
    return names


def load_state(folder: Path, *, large: bool = True) -> TrainState:
    """Read and verify a state folder; a damaged one raises FluxpipeError naming it. ``large=False`` leaves
    the weights' and the optimizer's tensors unread (None in their place): what a sharded rank other than 0
    needs, since rank 0 broadcasts them."""
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FluxpipeError(f"{folder}: not a readable training state ({e})") from e
    if meta.get("version") != STATE_VERSION:
        raise FluxpipeError(f"{folder}: training state version {meta.get('version')} is not {STATE_VERSION}")
    fix = f"delete {folder} to resume from an earlier state (or from the start)"
    try:
        digest = _sha256(folder / TENSORS)
    except OSError as e:
        raise FluxpipeError(f"{folder / TENSORS}: missing or unreadable ({e.strerror}): {fix}") from e
    if digest != meta.get("tensors_sha256"):
        raise FluxpipeError(
            f"{folder / TENSORS}: does not match the sha256 recorded in {folder / META} (damaged): {fix}"
        )
    if large:
        tensors = load_file(str(folder / TENSORS))
    else:
        from safetensors import safe_open

        wanted: set[str] = set()
        for name in ("scheduler", "rng", "extra"):
            _tensor_names(meta[name], wanted)
        with safe_open(str(folder / TENSORS), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in wanted}
    parts = {name: _join(meta[name], tensors) for name in ("weights", "optimizer", "scheduler", "rng", "extra")}
    return TrainState(step=meta["step"], epoch=meta["epoch"], batch_in_epoch=meta["batch_in_epoch"], **parts)


def newest_state(output_dir: Path, name: str, settings: str | None = None) -> Path | None:
    """The most advanced complete state folder of a run (``<name>-state`` or numbered ones), if any; with
    ``settings``, only states made with that settings digest count."""
    best, best_step = None, -1
    for folder in output_dir.glob(f"{name}*-state"):
        try:
            meta = json.loads((folder / META).read_text(encoding="utf-8"))
            step = meta["step"]
            made_with = _join(meta["extra"], {}).get("settings") if settings is not None else None
        except (OSError, ValueError, KeyError, AttributeError):
            continue  # a damaged or foreign folder is never resumed from
        if step > best_step and made_with == settings:
            best, best_step = folder, step
    return best
