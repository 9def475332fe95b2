"""Progress where the user looks: the bar on the terminal when stderr is a log file, plain lines in the log."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fluxpipe.cli.common import job_threads
from fluxpipe.io import progress as progress_mod
from fluxpipe.io.progress import progress, terminal


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_choice() -> None:
    tty = _Tty()
    assert terminal({}, tty) is tty  # run by hand: stderr itself
    assert terminal({"FLUXPIPE_PROGRESS": "0"}, tty) is None


def test_no_terminal_writes_plain_lines_to_the_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_mod, "terminal", lambda: None)
    log = io.StringIO()
    with progress(total=3, desc="latents shard 0", unit="img", log=log, log_every=1e9) as bar:
        for _ in range(3):
            bar.update(1)
    lines = log.getvalue().splitlines()
    # one line, at the end (log_every not reached), without carriage returns
    assert len(lines) == 1 and "\r" not in log.getvalue(), lines
    assert lines[0].startswith("latents shard 0: 100%") and "3/3" in lines[0] and "img/s" in lines[0]


def test_terminal_gets_the_bar_and_the_log_its_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    tty, log = _Tty(), io.StringIO()
    tty.close = lambda: None  # type: ignore[method-assign] # (read it afterwards)
    monkeypatch.setattr(progress_mod, "terminal", lambda: tty)
    with progress(total=4, desc="train demo", unit="step", log=log, log_every=0.0, mininterval=0) as bar:
        for _ in range(4):
            bar.set_postfix(loss="0.5000")
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert [re.search(r" (\d/4) ", line)[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"], lines  # type: ignore[index]
    assert "|" not in log.getvalue()  # (the log's lines: the counts, no bar)
    assert "loss=0.5000" in lines[-1]
    assert "\r" in tty.getvalue() and "4/4" in tty.getvalue()


def test_stopped_early_logs_where_it_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_mod, "terminal", lambda: None)
    log = io.StringIO()
    bar = progress(total=10, desc="x", log=log, log_every=1e9)
    bar.update(3)
    bar.close()
    assert log.getvalue().count("\n") == 1 and "3/10" in log.getvalue()


def test_iterating_logs_the_final_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_mod, "terminal", lambda: None)
    log = io.StringIO()
    assert list(progress(range(5), desc="manifest", log=log, log_every=1e9)) == [0, 1, 2, 3, 4]
    assert "5/5" in log.getvalue()


@pytest.mark.skipif(shutil.which("script") is None, reason="needs util-linux script (a pseudo-terminal)")
def test_under_a_terminal_with_stderr_in_a_log(tmp_path: Path) -> None:
    """As a Snakemake job runs: `cmd > log 2>&1` in a terminal. The bar reaches the terminal (/dev/tty)."""
    log = tmp_path / "job.log"
    code = (
        "from fluxpipe.io.progress import progress\n"
        "with progress(total=2, desc='text shard 0', unit='caption', mininterval=0) as bar:\n"
        "    bar.update(1); bar.update(1)\n"
    )
    inner = f"{sys.executable} -c {_q(code)} > {_q(str(log))} 2>&1"
    shown = subprocess.run(
        ["script", "-qec", inner, "/dev/null"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "text shard 0: 100%" in shown.stdout and "2/2" in shown.stdout, shown.stdout
    logged = log.read_text()
    assert "\r" not in logged and logged.count("2/2") == 1 and "caption/s" in logged, logged


def _q(s: str) -> str:
    import shlex

    return shlex.quote(s)


@pytest.mark.parametrize(
    ("env", "threads"),
    [
        ({"OMP_NUM_THREADS": "8"}, 8),
        ({"OMP_NUM_THREADS": "8", "LOCAL_WORLD_SIZE": "2"}, 4),
        ({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "4"}, 1),
        ({}, None),
        ({"OMP_NUM_THREADS": "x"}, None),
    ],
)
def test_job_threads(env: dict[str, str], threads: int | None) -> None:
    assert job_threads(env) == threads


def test_torch_commands_take_the_jobs_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from fluxpipe.cli.common import use_job_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        use_job_threads("manifest")  # (no torch work: left alone)
        assert torch.get_num_threads() == before
        use_job_threads("train")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
