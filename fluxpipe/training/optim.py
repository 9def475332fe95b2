"""Optimizers and learning-rate schedules by the reference trainer's names, from well-kept libraries.

``build_optimizer`` maps ``--optimizer_type`` (case-insensitive; the names are fluxpipe.config.names.OPTIMIZERS) to
torch, bitsandbytes, transformers (Adafactor), lion_pytorch, dadaptation, prodigyopt or schedulefree, or imports a
``module.Class`` path, with ``--optimizer_args`` values; ``build_scheduler`` maps
``--lr_scheduler`` to transformers' schedule functions; ``resolve_warmup`` reads the int / fraction / "N%"
forms of ``--lr_warmup_steps``.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from fluxpipe.config.names import (
    LR_SCHEDULERS,
    OPTIMIZERS,
    canonical_optimizer,
    import_class,
    is_schedule_free,
    optimizer_class,
)
from fluxpipe.errors import FluxpipeError

log = logging.getLogger(__name__)


def parse_optimizer_args(args: Iterable[str], flag: str = "optimizer_args") -> dict[str, Any]:
    """['betas=(0.9,0.99)', 'weight_decay=0.01'] -> {'betas': (0.9, 0.99), 'weight_decay': 0.01} (literals only)."""
    out: dict[str, Any] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key.strip():
            raise FluxpipeError(f"--{flag} {arg!r}: expected key=value")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()  # a bare word, e.g. a string option
    return out


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
    name = canonical_optimizer(name)
    cls: Any = optimizer_class(name)
    params = dict(inspect.signature(cls.__init__).parameters)
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
        forced = OPTIMIZERS[name].defaults if name in OPTIMIZERS else {}
        default = forced.get(key, params[key].default)
        if (problem := _kind_problem(key, default, value)) is not None:
            raise FluxpipeError(f"--optimizer_args {given[key]}: {problem}")
    return args


def build_optimizer(
    name: str, param_groups: list[dict[str, Any]], lr: float, optimizer_args: dict[str, Any]
) -> torch.optim.Optimizer:
    """The optimizer over ``param_groups`` (each may carry its own lr)."""
    canonical = canonical_optimizer(name)
    defaults = OPTIMIZERS[canonical].defaults if canonical in OPTIMIZERS else {}
    cls = optimizer_class(canonical)
    kwargs = {**defaults, **optimizer_args}
    if canonical == "Adafactor":
        kwargs = _adafactor_kwargs(kwargs, param_groups, lr)
    else:
        kwargs["lr"] = lr
    optimizer = cls(param_groups, **kwargs)
    if is_schedule_free(canonical):  # schedule-free optimizers start in eval mode; training steps need train mode
        optimizer.train()
    return optimizer


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


SCHEDULERS = tuple(n for n in LR_SCHEDULERS if n != "adafactor")  # transformers' names


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
    scheduler_type: str = "",
    scheduler_args: dict[str, Any] | None = None,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule as the reference builds it (spec §8.2): a constant one for the schedule-free optimizers,
    Adafactor's own for ``adafactor``, a ``scheduler_type`` class (module.Class, or a torch.optim.lr_scheduler
    name) over ``scheduler_args``, else transformers' schedule of that name (``scheduler_args`` on top)."""
    args = dict(scheduler_args or {})
    if type(optimizer).__module__.startswith("schedulefree"):  # the reference's DummyScheduler: lr stays as set
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if name == "adafactor":
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer, initial_lr=optimizer.defaults.get("lr") or 0.0)
    if scheduler_type:
        path = scheduler_type if "." in scheduler_type else f"torch.optim.lr_scheduler.{scheduler_type}"
        return import_class(path, "lr_scheduler_type")(optimizer, **args)
    if name == "piecewise_constant":
        rules = piecewise_rules(str(args.pop("step_rules", "")))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: piecewise_multiplier(rules, step), **args)
    if name not in SCHEDULERS:
        raise FluxpipeError(f"--lr_scheduler {name!r} is not one of {', '.join(LR_SCHEDULERS)}")
    if name == "constant" and warmup_steps:
        raise FluxpipeError("--lr_scheduler constant takes no warmup: use constant_with_warmup")
    if name == "constant":  # transformers' constant schedule (it ignores scheduler_args), without importing
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # transformers.optimization (peft, ~1 s)
    from transformers import get_scheduler

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
        scheduler_specific_kwargs={**extra, **args} or None,
    )


def piecewise_rules(text: str) -> tuple[tuple[tuple[int, float], ...], float]:
    """diffusers' ``step_rules`` of piecewise_constant: "1:10,0.1:20,0.01" is multiplier 1 before step 10, 0.1
    before step 20, then 0.01."""
    *pairs, last = text.split(",")
    try:
        rules = tuple(sorted((int(s), float(m)) for m, s in (p.split(":") for p in pairs)))
        return rules, float(last)
    except ValueError:
        raise FluxpipeError(
            f"--lr_scheduler_args step_rules={text!r}: write multiplier:step,...,final_multiplier (e.g. 1:10,0.1:20,0.01)"
        ) from None


def piecewise_multiplier(rules: tuple[tuple[tuple[int, float], ...], float], step: int) -> float:
    """The multiplier of the first rule whose step is still ahead, else the final one."""
    return next((m for until, m in rules[0] if step < until), rules[1])


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


def use_eval_weights(optimizer: torch.optim.Optimizer) -> bool:
    """Switch a schedule-free optimizer's parameters to its averaged weights; False for any other optimizer."""
    if not type(optimizer).__module__.startswith("schedulefree"):
        return False
    optimizer.eval()  # type: ignore[attr-defined]
    return True


@contextlib.contextmanager
def eval_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """The weights a schedule-free optimizer evaluates (its averaged x, not the training point y) while inside, as
    the reference switches them around saving; other optimizers: nothing happens."""
    schedule_free = use_eval_weights(optimizer)
    try:
        yield
    finally:
        if schedule_free:
            optimizer.train()  # type: ignore[attr-defined]
