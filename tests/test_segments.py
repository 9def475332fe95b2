"""Training in segments (`--stop_at_step`, the pipeline's train_segment_steps): a run cut into chained jobs,
each resuming the last one's state, ends exactly where one uninterrupted run ends, for all three methods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from fluxpipe.cli import main


@pytest.fixture(autouse=True)
def _from_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the demo dataset TOML names its images relative to the repository


def _command(method: str, demo: Path, out: Path) -> list[str]:
    from test_train_controlnet import cn_command
    from test_train_full import full_command
    from test_train_lora import seed_command

    if method == "lora":
        return seed_command(demo, out)
    if method == "full":  # the README settings less the fused backward pass, so that AdamW state is resumed too
        a = full_command(demo, out)
        a.remove("--fused_backward_pass")
        a[a.index("--optimizer_type") + 1] = "AdamW"
        del a[a.index("--optimizer_args") : a.index("--optimizer_args") + 4]
        return a
    return cn_command(demo, out)


def _names(method: str) -> tuple[str, str]:
    return {"lora": ("my_flux_lora", "lora"), "full": ("ft", "full"), "controlnet": ("cn", "controlnet")}[method]


@pytest.mark.parametrize("method", ["lora", "full", "controlnet"])
def test_a_chain_of_segments_equals_one_run(method: str, demo_dir: Path, tmp_path: Path) -> None:
    name, _ = _names(method)
    one, chain = tmp_path / "one", tmp_path / "chain"
    assert main(["train", method, *_command(method, demo_dir, one)]) == 0
    losses = [json.loads(x) for x in (one / f"{name}-loss.jsonl").read_text().splitlines()]
    total = losses[-1]["step"]
    assert total >= 3, total  # two epochs of at least two batches: the stops below fall inside an epoch and at its end
    per_epoch = sum(1 for r in losses if r["epoch"] == 0)
    stops = sorted({1, per_epoch})
    previous: list[str] = []
    for stop in stops:
        assert main(["train", method, *_command(method, demo_dir, chain), "--stop_at_step", str(stop), *previous]) == 0
        state = chain / f"{name}-seg{stop:08d}-state"
        assert (state / "state.json").is_file()
        assert not (chain / f"{name}.safetensors").exists()  # a segment writes no final file
        assert json.loads((state / "state.json").read_text())["step"] == stop
        previous = ["--resume", str(state)]
    assert main(["train", method, *_command(method, demo_dir, chain), *previous]) == 0
    a, b = load_file(str(one / f"{name}.safetensors")), load_file(str(chain / f"{name}.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    # the per-epoch file saved between the segments, and the loss log, are the uninterrupted run's too
    e1a, e1b = load_file(str(one / f"{name}-000001.safetensors")), load_file(str(chain / f"{name}-000001.safetensors"))
    assert all(torch.equal(e1a[k], e1b[k]) for k in e1a)
    chained = [json.loads(x) for x in (chain / f"{name}-loss.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in chained] == [(r["step"], r["loss"]) for r in losses]


def test_a_stop_before_the_resumed_step_is_one_error(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_train_lora import seed_command

    assert main(["train", "lora", *seed_command(demo_dir, tmp_path), "--stop_at_step", "2"]) == 0
    state = tmp_path / "my_flux_lora-seg00000002-state"
    assert (
        main(["train", "lora", *seed_command(demo_dir, tmp_path), "--stop_at_step", "2", "--resume", str(state)]) != 0
    )
    assert "already at step 2" in capsys.readouterr().err
    assert main(["train", "lora", *seed_command(demo_dir, tmp_path), "--stop_at_step", "0"]) != 0
    assert "positive" in capsys.readouterr().err
