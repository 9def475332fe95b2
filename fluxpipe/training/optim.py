"""Optimizers and learning-rate schedules by the reference trainer's names, from well-kept libraries.

``build_optimizer`` maps ``--optimizer_type`` (case-insensitive) to torch, bitsandbytes, transformers
(Adafactor), lion_pytorch or prodigyopt, with ``--optimizer_args`` values; ``build_scheduler`` maps
``--lr_scheduler`` to transformers' schedule functions; ``resolve_warmup`` reads the int / fraction / "N%"
forms of ``--lr_warmup_steps``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
from collections.abc import Iterable
from typing import Any

import torch

from fluxpipe.errors import FluxpipeError

log = logging.getLogger(__name__)

# canonical name -> (module, class, extra default kwargs)
OPTIMIZERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "AdamW": ("torch.optim", "AdamW", {}),
    "SGDNesterov": ("torch.optim", "SGD", {"nesterov": True, "momentum": 0.9}),
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit", {}),
    "PagedAdamW8bit": ("bitsandbytes.optim", "PagedAdamW8bit", {}),
    "PagedAdamW": ("bitsandbytes.optim", "PagedAdamW", {}),
    "PagedAdamW32bit": ("bitsandbytes.optim", "PagedAdamW32bit", {}),
    "Lion8bit": ("bitsandbytes.optim", "Lion8bit", {}),
    "PagedLion8bit": ("bitsandbytes.optim", "PagedLion8bit", {}),
    "SGDNesterov8bit": ("bitsandbytes.optim", "SGD8bit", {"nesterov": True, "momentum": 0.9}),
    "Lion": ("lion_pytorch", "Lion", {}),
    "Prodigy": ("prodigyopt", "Prodigy", {}),
    "Adafactor": ("transformers.optimization", "Adafactor", {}),
}
PACKAGES = {"bitsandbytes.optim": "bitsandbytes", "lion_pytorch": "lion-pytorch", "prodigyopt": "prodigyopt"}


def canonical_optimizer(name: str) -> str:
    for canonical in OPTIMIZERS:
        if canonical.lower() == name.lower():
            return canonical
    raise FluxpipeError(f"--optimizer_type {name!r} is not one of {', '.join(OPTIMIZERS)}")


def parse_optimizer_args(args: Iterable[str]) -> dict[str, Any]:
    """['betas=(0.9,0.99)', 'weight_decay=0.01'] -> {'betas': (0.9, 0.99), 'weight_decay': 0.01} (literals only)."""
    out: dict[str, Any] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key.strip():
            raise FluxpipeError(f"--optimizer_args {arg!r}: expected key=value")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()  # a bare word, e.g. a string option
    return out


def _optimizer_class(canonical: str) -> type:
    module_name, class_name, _ = OPTIMIZERS[canonical]
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except ImportError as e:
        package = PACKAGES.get(module_name, module_name)
        raise FluxpipeError(f"--optimizer_type {canonical} needs the package {package}: pip install {package}") from e


def _kind_problem(key: str, default: Any, value: Any) -> str | None:
    """Why ``value`` cannot stand where the optimizer's default is ``default`` (None: it can, or unknown)."""
    number = (int, float)
    if isinstance(default, tuple) and all(isinstance(d, number) for d in default):
        ok = (
            isinstance(value, tuple | list)
            and len(value) == len(default)
            and all(isinstance(v, number) and not isinstance(v, bool) for v in value)
        )
        example = ",".join(str(d) for d in default)
        return None if ok else f"{key} must be a tuple of {len(default)} floats, e.g. {key}={example}"
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"{key} must be True or False, e.g. {key}={default}"
    if isinstance(default, number):
        ok = isinstance(value, number) and not isinstance(value, bool)
        return None if ok else f"{key} must be a number, e.g. {key}={default}"
    return None


def check_optimizer_args(name: str, raw: list[str]) -> dict[str, Any]:
    """``--optimizer_args`` parsed and checked against the optimizer's signature (names, tuple lengths, number
    and bool types), so that a typo fails before any model loads; returns the parsed values."""
    args = parse_optimizer_args(raw)
    if name not in OPTIMIZERS:  # a module.Class path, or one fluxpipe has no class for (refused when built)
        return args
    params = dict(inspect.signature(_optimizer_class(name).__init__).parameters)
    params.pop("self", None)
    params.pop("params", None)
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    given = {a.partition("=")[0].strip(): a for a in raw}
    for key, value in args.items():
        if key not in params:
            if open_kwargs:
                continue
            raise FluxpipeError(
                f"--optimizer_args {given[key]}: {name} has no argument {key!r} (it takes "
                f"{', '.join(k for k, p in params.items() if p.kind is not p.VAR_POSITIONAL)})"
            )
        default = OPTIMIZERS[name][2].get(key, params[key].default)
        if (problem := _kind_problem(key, default, value)) is not None:
            raise FluxpipeError(f"--optimizer_args {given[key]}: {problem}")
    return args


def build_optimizer(
    name: str, param_groups: list[dict[str, Any]], lr: float, optimizer_args: dict[str, Any]
) -> torch.optim.Optimizer:
    """The optimizer over ``param_groups`` (each may carry its own lr)."""
    canonical = canonical_optimizer(name)
    defaults = OPTIMIZERS[canonical][2]
    cls = _optimizer_class(canonical)
    kwargs = {**defaults, **optimizer_args}
    if canonical == "Adafactor":
        kwargs = _adafactor_kwargs(kwargs, param_groups, lr)
    else:
        kwargs["lr"] = lr
    return cls(param_groups, **kwargs)


def _adafactor_kwargs(kwargs: dict[str, Any], groups: list[dict[str, Any]], lr: float) -> dict[str, Any]:
    """The reference's Adafactor handling: relative_step defaults to True, which makes the lr an initial
    value only; fluxpipe says so instead of silently dropping the configured learning rates."""
    kwargs.setdefault("relative_step", True)
    kwargs.setdefault("scale_parameter", True)
    kwargs.setdefault("warmup_init", False)
    if kwargs["relative_step"]:
        log.warning(
            "Adafactor with relative_step=True ignores the learning rates (the step size is relative); "
            "pass --optimizer_args relative_step=False scale_parameter=False warmup_init=False to use them"
        )
        for group in groups:
            group.pop("lr", None)
        kwargs["lr"] = None
    else:
        kwargs["lr"] = lr
    return kwargs


SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)


def resolve_warmup(value: int | float | str | None, total_steps: int) -> int:
    """--lr_warmup_steps: an int, a float < 1 (fraction of the total), or 'N%'."""
    if value is None:
        return 0
    if isinstance(value, str):
        text = value.strip()
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text) if "." in text else int(text)
    if isinstance(value, float) and value < 1:
        return int(value * total_steps)
    return int(value)


def build_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    num_cycles: int = 1,
    power: float = 1.0,
    min_lr_ratio: float | None = None,
    timescale: int | None = None,
) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers' schedule of that name over ``total_steps`` optimizer steps."""
    from transformers import get_scheduler

    if name not in SCHEDULERS:
        raise FluxpipeError(f"--lr_scheduler {name!r} is not one of {', '.join(SCHEDULERS)}")
    if name == "constant" and warmup_steps:
        raise FluxpipeError("--lr_scheduler constant takes no warmup: use constant_with_warmup")
    extra: dict[str, Any] = {}
    if name == "cosine_with_restarts":
        extra["num_cycles"] = num_cycles
    elif name == "polynomial":
        extra["power"] = power
    elif name == "cosine_with_min_lr":
        extra["min_lr_rate"] = min_lr_ratio if min_lr_ratio is not None else 0.0
    elif name == "inverse_sqrt" and timescale is not None:
        extra["timescale"] = timescale
    elif name == "warmup_stable_decay":
        extra.update(num_decay_steps=max(total_steps // 10, 1), min_lr_ratio=min_lr_ratio or 0.0)
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=total_steps,
        scheduler_specific_kwargs=extra or None,
    )


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict`` without its cast of the state to the parameters' dtype: Adafactor keeps
    fp32 moments for bf16 weights, and the cast would round them (a resumed run would then drift from an
    uninterrupted one)."""
    optimizer.load_state_dict(state)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, saved in state["state"].items():
        param = params[int(index)]
        for key, value in saved.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and key != "step":
                optimizer.state[param][key] = value.to(param.device)
