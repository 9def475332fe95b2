"""Training state: exact round trip of weights, optimizer, scheduler and RNG; damage is detected."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from fluxpipe.errors import FluxpipeError
from fluxpipe.training.state import TrainState, capture_rng, load_state, newest_state, restore_rng, save_state


def make(seed: int = 0) -> tuple[torch.nn.Linear, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def step(model, opt, sched, gen: torch.Generator) -> None:  # noqa: ANN001
    x = torch.randn(2, 4, generator=gen)
    model(x).pow(2).sum().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_resume_continues_exactly(tmp_path: Path) -> None:
    model, opt, sched = make()
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        step(model, opt, sched, gen)
    state = TrainState(
        step=3,
        epoch=1,
        batch_in_epoch=2,
        weights=dict(model.state_dict()),
        optimizer=opt.state_dict(),
        scheduler=sched.state_dict(),
        rng=capture_rng({"noise": gen}),
        extra={"note": "x", "pair": (1, 2)},
    )
    save_state(state, tmp_path / "run-state")
    for _ in range(2):  # the uninterrupted run goes on
        step(model, opt, sched, gen)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    python_next = random.random()

    loaded = load_state(tmp_path / "run-state")
    assert (loaded.step, loaded.epoch, loaded.batch_in_epoch, loaded.extra) == (3, 1, 2, {"note": "x", "pair": (1, 2)})
    model2, opt2, sched2 = make(seed=1)  # different init: everything must come from the state
    model2.load_state_dict(loaded.weights)
    opt2.load_state_dict(loaded.optimizer)
    sched2.load_state_dict(loaded.scheduler)
    gen2 = torch.Generator()
    restore_rng(loaded.rng, {"noise": gen2})
    assert random.random() == python_next
    for _ in range(2):
        step(model2, opt2, sched2, gen2)
    for k, v in expected.items():
        assert torch.equal(model2.state_dict()[k], v), k
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_damaged_state_is_refused(tmp_path: Path) -> None:
    model, opt, sched = make()
    save_state(
        TrainState(
            step=1,
            epoch=0,
            batch_in_epoch=1,
            weights=dict(model.state_dict()),
            optimizer=opt.state_dict(),
            scheduler=sched.state_dict(),
        ),
        tmp_path / "a-state",
    )
    tensors = tmp_path / "a-state" / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(FluxpipeError, match="does not match the sha256 recorded"):
        load_state(tmp_path / "a-state")


def test_newest_state_by_step_ignores_damage(tmp_path: Path) -> None:
    model, opt, sched = make()
    for name, s in (("run-000001-state", 4), ("run-step00000009-state", 9), ("run-state", 7)):
        save_state(
            TrainState(
                step=s,
                epoch=0,
                batch_in_epoch=0,
                weights=dict(model.state_dict()),
                optimizer=opt.state_dict(),
                scheduler=sched.state_dict(),
            ),
            tmp_path / name,
        )
    (tmp_path / "run-000002-state").mkdir()  # an empty (foreign or half-made) folder
    assert newest_state(tmp_path, "run") == tmp_path / "run-step00000009-state"
    assert not list(tmp_path.glob(".*tmp"))  # no temporary folders left behind


def test_a_rank_that_is_not_rank_0_reads_only_the_small_parts(tmp_path: Path) -> None:
    weights = {"w": torch.ones(3)}
    optimizer = {
        "state": {0: {"exp_avg": torch.full((3,), 2.0), "step": torch.tensor(4.0)}},
        "param_groups": [{"lr": 0.1, "params": [0]}],
    }
    save_state(
        TrainState(
            step=4,
            epoch=1,
            batch_in_epoch=2,
            weights=weights,
            optimizer=optimizer,
            scheduler={"last_epoch": 4},
            rng=capture_rng({}),
            extra={"settings": "s"},
        ),
        tmp_path / "s",
    )
    small = load_state(tmp_path / "s", large=False)
    assert small.weights == {"w": None} and small.optimizer["state"][0]["exp_avg"] is None
    assert small.optimizer["param_groups"] == [{"lr": 0.1, "params": [0]}]  # the plain values are all there
    assert (small.step, small.epoch, small.batch_in_epoch, small.scheduler) == (4, 1, 2, {"last_epoch": 4})
    assert torch.equal(small.rng["torch"], load_state(tmp_path / "s").rng["torch"])
    assert torch.equal(load_state(tmp_path / "s").optimizer["state"][0]["exp_avg"], torch.full((3,), 2.0))
