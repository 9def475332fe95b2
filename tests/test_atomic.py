"""Temporaries a killed writer left (its name says which process wrote it) are removed by the next write."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from fluxpipe.io.atomic import HOST, write_text_atomic
from fluxpipe.io.safetensors_file import save_safetensors
from fluxpipe.training.state import TrainState, load_state, save_state


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def aged(path: Path, seconds: float = 2 * 3600) -> Path:
    past = time.time() - seconds
    os.utime(path, (past, past))
    return path


def plant(folder: Path, target: str) -> tuple[list[Path], list[Path]]:
    """Temporaries of ``target`` a killed writer would leave (stale) and ones that must stay (kept)."""
    pid = dead_pid()
    stale = [
        folder / f".{target}.{HOST}-{pid}.ab_c1234.tmp",  # mkstemp's part, a dead writer on this host
        folder / f".{target}.k2j4h5g6.tmp",  # the older naming (no writer), two hours old
        folder / f".{target}.otherhost-{os.getpid()}.zz99yy88.tmp",
    ]  # another host's, two hours old
    kept = [
        folder / f".{target}.{HOST}-{os.getpid()}.qwer5678.tmp",  # a live writer (this process)
        folder / f".{target}.{HOST}-{os.getppid()}.qwer5678.tmp",  # a live writer (another process)
        folder / f".{target}.k2j4h5g7.tmp",  # older naming, fresh: perhaps still being written
        folder / f".{target}.otherhost-{pid}.zz99yy89.tmp",  # another host's pid says nothing here
        folder / f".{target}.notes",
        folder / f"{target}.tmp",
        folder / f".{target}.{HOST}-{pid}.tmp",
        folder / f".other.{HOST}-{pid}.ab_c1234.tmp",
    ]  # not this pattern, or another target
    for p in stale + kept:
        if not p.exists():
            p.write_text("x")
    for p in stale:
        if "k2j4h5g6" in p.name or "otherhost" in p.name:
            aged(p)
    return stale, kept


def test_a_write_removes_what_a_killed_writer_of_the_same_file_left(tmp_path: Path) -> None:
    stale, kept = plant(tmp_path, "lora.safetensors")
    save_safetensors({"a": torch.zeros(2)}, tmp_path / "lora.safetensors", {})
    assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in kept)
    stale, kept = plant(tmp_path, "report.json")
    write_text_atomic(tmp_path / "report.json", "{}")
    assert [p for p in stale if p.exists()] == [] and all(p.exists() for p in kept)
    assert (tmp_path / "report.json").read_text() == "{}"


def test_a_state_save_removes_a_killed_save_s_folders(tmp_path: Path) -> None:
    pid = dead_pid()
    folder = tmp_path / "run-state"
    orphans = [
        tmp_path / f".run-state.{HOST}-{pid}.{'a1' * 16}.tmp",
        tmp_path / f".run-state.{HOST}-{pid}.{'b2' * 16}.old",
        tmp_path / f".run-state.{'c3' * 16}.tmp",
    ]  # the last in the older naming, two hours old
    for d in orphans:
        d.mkdir()
        (d / "tensors.safetensors").write_text("partial")
        aged(d / "tensors.safetensors")
        aged(d)
    live = tmp_path / f".run-state.{HOST}-{os.getppid()}.{'d4' * 16}.tmp"
    live.mkdir()
    other = tmp_path / "run-state-notes"
    other.mkdir()
    save_state(
        TrainState(step=1, epoch=0, batch_in_epoch=1, weights={"w": torch.ones(1)}, optimizer={}, scheduler={}), folder
    )
    assert [d for d in orphans if d.exists()] == []
    assert live.is_dir() and other.is_dir() and load_state(folder).step == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([folder.name, live.name, other.name])
