"""Progress bars where the user looks.

Run by hand, a `fluxpipe` command's bars go to stderr, as tqdm's do. Run by a Snakemake rule, stderr is the
job's log file (`> logs/x.log 2>&1`): the bar then goes to the terminal Snakemake runs in (/dev/tty, when the
job has one) and the log gets the bar's line as plain text every ``log_every`` seconds and at the end, so the
log stays readable (no carriage returns). FLUXPIPE_PROGRESS=0 turns the terminal bar off (log lines only).
"""

from __future__ import annotations

import io
import os
import sys
import time
from typing import IO, Any

from tqdm import tqdm

LOG_EVERY_S = 30.0


def terminal(env: dict[str, str] | None = None, stderr: IO[str] | None = None) -> IO[str] | None:
    """Where a bar is drawn: stderr when it is a terminal, else /dev/tty when this process has one; None: no
    terminal (or FLUXPIPE_PROGRESS=0)."""
    env = dict(os.environ) if env is None else env
    stderr = sys.stderr if stderr is None else stderr
    if env.get("FLUXPIPE_PROGRESS", "1") == "0":
        return None
    if stderr.isatty():
        return stderr
    try:
        return open("/dev/tty", "w", encoding="utf-8", errors="replace")  # noqa: SIM115 - closed with the bar
    except OSError:
        return None


def _columns(f: IO[str]) -> int:
    try:
        return os.get_terminal_size(f.fileno()).columns
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return 0


class Progress(tqdm):
    """A tqdm bar on ``terminal()``, whose line also goes to the log (stderr) as text when the bar is elsewhere."""

    def __init__(self, *args: Any, log: IO[str] | None = None, log_every: float = LOG_EVERY_S, **kwargs: Any):
        log = sys.stderr if log is None else log
        tty = terminal()
        self._tty = tty if tty is not None and tty is not log else None
        self._log = log if self._tty is not None or tty is None else None
        self._log_every, self._logged, self._logged_n = log_every, time.monotonic(), -1.0
        if tty is None:  # no terminal: the log lines only
            kwargs["file"], kwargs["disable"] = open(os.devnull, "w"), kwargs.get("disable", False)  # noqa: SIM115
            self._devnull = kwargs["file"]
        else:
            kwargs["file"], self._devnull = tty, None
            if _columns(tty) == 0:  # (a pseudo-terminal without a size)
                kwargs.setdefault("ncols", 100)
            else:
                kwargs.setdefault("dynamic_ncols", True)
        super().__init__(*args, **kwargs)

    def _log_line(self, force: bool = False) -> None:
        if self._log is None or self.disable:
            return
        now = time.monotonic()
        if force or now - self._logged >= self._log_every:
            self._logged, self._logged_n = now, self.n
            print(self.format_meter(**{**self.format_dict, "ncols": 0}), file=self._log, flush=True)  # (no bar)

    def __iter__(self):  # noqa: ANN204
        for item in super().__iter__():
            yield item
            self._log_line()

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        self._log_line(force=self.total is not None and self.n >= self.total)
        return shown

    def close(self) -> None:
        if not self.disable:
            if self._logged_n != self.n:
                self._log_line(force=True)  # the final count (or where it stopped)
            super().close()
        for f in (self._tty, self._devnull):  # (our own handles: /dev/tty, os.devnull)
            if f is not None:
                f.close()
        self._tty = self._devnull = None


def progress(*args: Any, **kwargs: Any) -> Progress:
    """``tqdm(...)`` with its bar where the user looks (see the module docstring)."""
    return Progress(*args, **kwargs)


def announce(what: str) -> None:
    """One line for a long step (a model load): on the terminal and in the log."""
    tty = terminal()
    print(what, file=sys.stderr, flush=True)
    if tty is not None and tty is not sys.stderr:
        print(what, file=tty, flush=True)
        tty.close()
