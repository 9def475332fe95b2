"""One table of names (fluxpipe.config.names): every optimizer, LR scheduler and network module the flag parser
accepts builds, and what cannot build is refused at parse time with one line naming the flag."""

from __future__ import annotations

import sys

import pytest
import torch

from fluxpipe.config.names import NETWORK_ARGS, OPTIMIZERS, LR_SCHEDULERS
from fluxpipe.config.reference_flags import parse_train_args
from fluxpipe.errors import FluxpipeError
from fluxpipe.training.optim import build_optimizer, build_scheduler, check_optimizer_args, parse_optimizer_args

BASE = ["--network_module", "networks.lora_flux"]
BNB = {n for n, e in OPTIMIZERS.items() if e.module.startswith("bitsandbytes")}


def fails(argv: list[str], *needles: str) -> str:
    with pytest.raises(FluxpipeError) as info:
        parse_train_args(argv)
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in needles), message
    return message


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_accepted_optimizer_name_builds_and_steps_downhill(name: str) -> None:
    """Each name parses (in any case) and builds its table class over one parameter; one step on loss = p (gradient
    +1 from p = 0) moves p below 0, whatever the optimizer's step size."""
    if OPTIMIZERS[name].package and OPTIMIZERS[name].package != "bitsandbytes":
        pytest.importorskip(OPTIMIZERS[name].module)
    assert parse_train_args(BASE + ["--optimizer_type", name.lower()]).optimizer_type == name
    p = torch.nn.Parameter(torch.zeros(4))
    opt = build_optimizer(name, [{"params": [p]}], 0.1, {})
    assert type(opt).__name__ == OPTIMIZERS[name].cls
    assert type(opt).__module__.startswith(OPTIMIZERS[name].module.partition(".")[0])
    if name in BNB and not torch.cuda.is_available():
        return  # bitsandbytes' kernels step on CUDA only
    for _ in range(6):  # (RAdam's rectification makes no move for its first steps)
        opt.zero_grad()
        p.sum().backward()
        opt.step()
    assert (p.detach() < 0).all(), p


def test_sgd_nesterov_keeps_the_reference_defaults() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    group = build_optimizer("sgdnesterov", [{"params": [p]}], 0.1, {}).param_groups[0]
    assert (group["nesterov"], group["momentum"], group["lr"]) == (True, 0.9, 0.1)


def test_schedule_free_optimizer_trains_in_train_mode_and_its_schedule_is_constant() -> None:
    pytest.importorskip("schedulefree")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer("AdamWScheduleFree", [{"params": [p]}], 0.5, {})
    assert opt.param_groups[0]["train_mode"] is True
    sched = build_scheduler("cosine", opt, total_steps=10, warmup_steps=0)
    lrs = []
    for _ in range(4):
        lrs.append(sched.get_last_lr()[0])
        sched.step()
    assert lrs == [0.5] * 4


@pytest.mark.parametrize(
    "module, extra, name", [("dadaptation", "optimizers", "DAdaptAdam"), ("prodigyopt", "optimizers", "Prodigy")]
)
def test_missing_optimizer_package_is_refused_at_parse_time(
    monkeypatch: pytest.MonkeyPatch, module: str, extra: str, name: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import of it fails, as when not installed
    fails(BASE + ["--optimizer_type", name], "--optimizer_type", f"fluxpipe[{extra}]", module)


def test_unknown_optimizer_and_bad_class_paths_are_refused_at_parse_time() -> None:
    fails(BASE + ["--optimizer_type", "AdamX"], "--optimizer_type", "AdamX")
    fails(BASE + ["--optimizer_type", "torch.optim.NoSuchAdam"], "--optimizer_type", "NoSuchAdam")
    fails(BASE + ["--optimizer_type", "no_such_module.Opt"], "--optimizer_type", "no_such_module")


def test_a_module_class_path_builds_with_its_args() -> None:
    ns = parse_train_args(BASE + ["--optimizer_type", "torch.optim.Adam", "--optimizer_args", "betas=(0.5,0.6)"])
    assert ns.optimizer_type == "torch.optim.Adam"
    args = check_optimizer_args(ns.optimizer_type, ns.optimizer_args)
    opt = build_optimizer(ns.optimizer_type, [{"params": [torch.nn.Parameter(torch.zeros(1))]}], 0.01, args)
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["betas"] == (0.5, 0.6)
    with pytest.raises(FluxpipeError, match="--optimizer_args"):
        check_optimizer_args("torch.optim.Adam", ["no_such_arg=1"])


def _lrs(sched: torch.optim.lr_scheduler.LRScheduler, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(round(sched.get_last_lr()[0], 6))
        sched.optimizer.step()
        sched.step()
    return out


def _opt(name: str = "AdamW", **kw: object) -> torch.optim.Optimizer:
    return build_optimizer(name, [{"params": [torch.nn.Parameter(torch.zeros(1))]}], 1.0, dict(kw))


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_every_accepted_scheduler_name_builds(name: str) -> None:
    argv = BASE + ["--lr_scheduler", name]
    if name == "adafactor":
        argv += ["--optimizer_type", "Adafactor"]
    if name == "piecewise_constant":
        argv += ["--lr_scheduler_args", "step_rules=1:2,0.1"]
    ns = parse_train_args(argv)
    opt = _opt(ns.optimizer_type)
    args = parse_optimizer_args(ns.lr_scheduler_args or [], "lr_scheduler_args")
    sched = build_scheduler(ns.lr_scheduler, opt, 10, 0, scheduler_args=args)
    assert len(_lrs(sched, 3)) == 3


def test_scheduler_values_by_hand() -> None:
    # linear, warmup 2 of 10: 0, 0.5, 1, then down by 1/8 a step
    assert _lrs(build_scheduler("linear", _opt(), 10, 2), 4) == [0.0, 0.5, 1.0, 0.875]
    # piecewise_constant 1:2,0.1 -> multiplier 1 before step 2, then 0.1
    rules = {"step_rules": "1:2,0.1"}
    assert _lrs(build_scheduler("piecewise_constant", _opt(), 10, 0, scheduler_args=rules), 4) == [1, 1, 0.1, 0.1]
    # --lr_scheduler_type StepLR (torch.optim.lr_scheduler, as the reference) step_size=2 gamma=0.5
    step = build_scheduler(
        "constant", _opt(), 10, 0, scheduler_type="StepLR", scheduler_args=dict(step_size=2, gamma=0.5)
    )
    assert _lrs(step, 5) == [1, 1, 0.5, 0.5, 0.25]
    mod = build_scheduler(
        "x", _opt(), 10, 0, scheduler_type="torch.optim.lr_scheduler.ExponentialLR", scheduler_args={"gamma": 0.5}
    )
    assert _lrs(mod, 3) == [1, 0.5, 0.25]


def test_scheduler_refusals_at_parse_time() -> None:
    fails(BASE + ["--lr_scheduler", "cosine_annealing"], "--lr_scheduler", "cosine_annealing")
    fails(BASE + ["--lr_scheduler", "adafactor"], "--lr_scheduler", "Adafactor")
    fails(BASE + ["--lr_scheduler", "piecewise_constant"], "--lr_scheduler", "step_rules")
    fails(BASE + ["--lr_scheduler_type", "NoSuchLR"], "--lr_scheduler_type", "NoSuchLR")
    fails(BASE + ["--lr_scheduler_type", "StepLR", "--lr_warmup_steps", "3"], "--lr_warmup_steps")
    assert parse_train_args(BASE + ["--lr_scheduler_type", "StepLR"]).lr_scheduler_type == "StepLR"
    with pytest.raises(FluxpipeError, match="step_rules"):
        build_scheduler("piecewise_constant", _opt(), 10, 0, scheduler_args={"step_rules": "1:x,0.1"})


def test_network_args_keys_are_checked_at_parse_time() -> None:
    fails(BASE + ["--network_args", "img_attn_dim=4", "algo=lokr"], "--network_args", "algo", "networks.lora_flux")
    fails(BASE + ["--network_args", "img_attn_dim"], "--network_args", "key=value")
    assert parse_train_args(BASE + ["--network_args", "img_attn_dim=4", "verbose=True"]).network_args


def test_lora_flux_keys_are_the_parsers_keys() -> None:
    from fluxpipe.lora.network import _PARSERS

    assert NETWORK_ARGS["networks.lora_flux"] == set(_PARSERS)


def test_cli_refusal_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    from fluxpipe.cli import main

    assert main(["train", "lora", *BASE, "--optimizer_type", "AdamX", "--output_dir", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fluxpipe: error: --optimizer_type"), err


def test_results_paths_are_spelled_in_one_module() -> None:
    """Every path under results/ comes from fluxpipe.config.results: no other module or rule file spells one."""
    import re

    from conftest import REPO

    from fluxpipe.config import results

    files = [REPO / "Snakefile", *(REPO / "rules").glob("*.smk"), *(REPO / "fluxpipe").rglob("*.py")]
    spelled = [
        str(p.relative_to(REPO))
        for p in files
        if p.name != "results.py" and re.search(r"[\"']results[/\"']", p.read_text())
    ]
    assert spelled == []
    assert results.shard_path("latents", 7) == "results/cache/latents/shard-007.safetensors"
    assert results.evaluate_dir("x") == "results/evaluate/x" and results.TRAIN_DIRS["full"] == "results/train/full"


def test_schedule_free_weights_for_saving_are_the_average() -> None:
    """SGDScheduleFree (momentum 0.9, lr 1, no warmup) on loss = p from p = 0: the train point y and the average x
    differ after two steps; eval_weights shows x and restores y (hand values from the schedule-free update)."""
    pytest.importorskip("schedulefree")
    from fluxpipe.training.optim import eval_weights

    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer("SGDScheduleFree", [{"params": [p]}], 1.0, {"momentum": 0.9, "warmup_steps": 0})
    for _ in range(2):
        opt.zero_grad()
        p.sum().backward()
        opt.step()
    y = p.detach().clone()
    with eval_weights(opt):
        x = p.detach().clone()
    assert torch.equal(p.detach(), y) and not torch.equal(x, y)
    # z after 2 steps is -2; x_1 = -1, x_2 = x_1 + (z_2 - x_1) / 2 = -1.5; y = 0.9 * x + 0.1 * z = -1.55
    torch.testing.assert_close(x, torch.tensor([-1.5]))
    torch.testing.assert_close(y, torch.tensor([-1.55]))


@pytest.mark.parametrize("method", ["full", "controlnet"])
def test_schedule_free_is_refused_for_the_full_and_controlnet_trainers(method: str) -> None:
    from fluxpipe.commands.train import check_supported

    ns = parse_train_args(["--optimizer_type", "AdamWScheduleFree", "--output_dir", "unused"], method)
    with pytest.raises(FluxpipeError, match="--optimizer_type AdamWScheduleFree: schedule-free optimizers train LoRAs"):
        check_supported(ns, "cpu", method)
