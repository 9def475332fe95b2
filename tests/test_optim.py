"""Optimizer and schedule factories by the reference's names, against hand-computed learning rates."""

from __future__ import annotations

import pytest
import torch

from fluxpipe.errors import FluxpipeError
from fluxpipe.training.optim import (
    build_optimizer,
    build_scheduler,
    canonical_optimizer,
    parse_optimizer_args,
    resolve_warmup,
)


def params() -> list[dict]:
    return [
        {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.5},
        {"params": [torch.nn.Parameter(torch.zeros(2))]},
    ]


def test_names_are_case_insensitive_and_unknown_ones_named() -> None:
    assert canonical_optimizer("adamw8bit") == "AdamW8bit"
    with pytest.raises(FluxpipeError, match="unknown optimizer 'AdamX': one of"):
        canonical_optimizer("AdamX")


def test_optimizer_args_are_literals() -> None:
    assert parse_optimizer_args(["betas=(0.9,0.99)", "weight_decay=0.01", "foo=bar"]) == {
        "betas": (0.9, 0.99),
        "weight_decay": 0.01,
        "foo": "bar",
    }
    with pytest.raises(FluxpipeError, match="expected key=value"):
        parse_optimizer_args(["weight_decay"])


def test_group_lrs_are_kept_and_the_default_fills_in() -> None:
    opt = build_optimizer("AdamW", params(), 1e-3, {"weight_decay": 0.0})
    assert [g["lr"] for g in opt.param_groups] == [0.5, 1e-3] and opt.param_groups[0]["weight_decay"] == 0.0
    sgd = build_optimizer("sgdnesterov", params(), 0.1, {})
    assert sgd.param_groups[1]["nesterov"] and sgd.param_groups[1]["momentum"] == 0.9


def test_adafactor_relative_step_and_explicit_lr() -> None:
    relative = build_optimizer("Adafactor", params(), 1e-3, {})
    assert relative.param_groups[0]["relative_step"] and relative.param_groups[0]["lr"] is None
    fixed = build_optimizer("Adafactor", params(), 1e-3, {"relative_step": False, "scale_parameter": False})
    assert [g["lr"] for g in fixed.param_groups] == [0.5, 1e-3]


def test_warmup_forms() -> None:
    assert (resolve_warmup(10, 100), resolve_warmup(0.1, 200), resolve_warmup("5%", 200), resolve_warmup(None, 9)) == (
        10,
        20,
        10,
        0,
    )


def test_schedules_by_hand() -> None:
    opt = build_optimizer("AdamW", [{"params": [torch.nn.Parameter(torch.zeros(1))]}], 1.0, {})
    sched = build_scheduler("linear", opt, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(5):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    # warmup 0, 0.5, then linear decay over the remaining 8 steps: 1, 7/8, 6/8
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.875, 0.75])
    with pytest.raises(FluxpipeError, match="constant takes no warmup"):
        build_scheduler("constant", opt, 10, 2)
    with pytest.raises(FluxpipeError, match="is not one of"):
        build_scheduler("adafactorish", opt, 10, 0)


def test_bitsandbytes_optimizer_or_a_clear_error() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(FluxpipeError, match="pip install bitsandbytes"):
            build_optimizer("AdamW8bit", params(), 1e-3, {})
    else:
        assert type(build_optimizer("AdamW8bit", params(), 1e-3, {})).__name__ == "AdamW8bit"


def test_resumed_adafactor_keeps_fp32_moments_of_bf16_weights() -> None:
    from fluxpipe.training.optim import build_optimizer, load_optimizer_state

    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(8, 4).bfloat16())
    opt = build_optimizer(
        "Adafactor",
        [{"params": [param], "lr": 1e-3}],
        1e-3,
        {"relative_step": False, "scale_parameter": False, "warmup_init": False},
    )
    param.grad = torch.randn(8, 4).bfloat16()
    opt.step()
    saved = opt.state_dict()
    row = opt.state[param]["exp_avg_sq_row"]
    assert row.dtype == torch.float32
    fresh = build_optimizer(
        "Adafactor",
        [{"params": [param], "lr": 1e-3}],
        1e-3,
        {"relative_step": False, "scale_parameter": False, "warmup_init": False},
    )
    fresh.load_state_dict(saved)  # torch's own load casts to bf16: the moments get rounded
    assert fresh.state[param]["exp_avg_sq_row"].dtype == torch.bfloat16
    load_optimizer_state(fresh, saved)
    assert torch.equal(fresh.state[param]["exp_avg_sq_row"], row)


def test_constant_schedule_equals_transformers_and_needs_no_transformers_import() -> None:
    """--lr_scheduler constant (the demo's) is transformers' constant schedule (which ignores scheduler_args), built
    without importing transformers.optimization: that import pulls in peft (and bitsandbytes) where installed,
    about 1 s of every training job's start-up."""
    import subprocess
    import sys

    from transformers import get_scheduler

    def lrs(sched: torch.optim.lr_scheduler.LRScheduler, opt: torch.optim.Optimizer) -> list[float]:
        out = []
        for _ in range(4):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    def opt() -> torch.optim.Optimizer:
        return build_optimizer("AdamW", [{"params": [torch.nn.Parameter(torch.zeros(1))]}], 3e-4, {})

    ours, theirs = opt(), opt()
    built = build_scheduler("constant", ours, 10, 0, scheduler_args={"power": 2.0})
    assert lrs(built, ours) == lrs(get_scheduler("constant", theirs), theirs) == [3e-4] * 4
    assert built.state_dict().keys() == get_scheduler("constant", opt()).state_dict().keys()  # resumable the same
    probe = (
        "import sys, torch\nfrom fluxpipe.training.optim import build_optimizer, build_scheduler\n"
        "o = build_optimizer('AdamW', [{'params': [torch.nn.Parameter(torch.zeros(1))]}], 1.0, {})\n"
        "build_scheduler('constant', o, 10, 0)\nprint('transformers.optimization' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stdout + out.stderr[-1000:]
