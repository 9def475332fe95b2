"""The trainers' output folder: checked before any model loads, and held by one run at a time.

``check_output_dir`` refuses a folder that is a file, cannot be created or is not writable (one line each).
``output_lock`` takes ``<output_dir>/.<output_name>.lock`` (JSON: pid, host, start time) with an exclusive create;
a second run on the same folder and name is refused naming the holder, a lock left by a dead process on this host
is taken over with a warning, and the lock is removed when the run ends (also on an error).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from fluxpipe.errors import FluxpipeError

log = logging.getLogger(__name__)


def check_output_dir(folder: Path) -> None:
    """Create ``folder`` if needed; FluxpipeError if it is a file, cannot be created or is not writable."""
    if folder.exists() and not folder.is_dir():
        raise FluxpipeError(f"--output_dir {folder}: is a file, not a folder; give a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FluxpipeError(f"--output_dir {folder}: cannot be created ({e.strerror}); give a folder you can "
                            "write to") from None
    probe = folder / f".fluxpipe-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FluxpipeError(f"--output_dir {folder}: cannot write into it ({e.strerror}); fix its permissions or "
                            "give another folder") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _holder(lock: Path) -> dict[str, object]:
    try:
        data = json.loads(lock.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _create(lock: Path, record: dict[str, object]) -> bool:
    """Write the lock with an exclusive create; False if it exists already."""
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f)
    return True


def acquire(folder: Path, name: str) -> Path:
    """Take the lock of (folder, name) or raise FluxpipeError naming who holds it."""
    lock = folder / f".{name}.lock"
    host = socket.gethostname()
    record = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if _create(lock, record):
        return lock
    held = _holder(lock)
    pid = held.get("pid")
    if held.get("host") == host and isinstance(pid, int) and not _alive(pid):
        log.warning("%s: taking over the lock of pid %d on %s, which has ended", lock, pid, host)
        lock.unlink(missing_ok=True)
        if _create(lock, record):
            return lock
        held = _holder(lock)
    raise FluxpipeError(
        f"--output_dir {folder}: another run writes {name} there (pid {held.get('pid', '?')} on host "
        f"{held.get('host', '?')}, since {held.get('started', '?')}; lock {lock}): wait for it, or use another "
        f"--output_dir/--output_name; if that run is gone, delete {lock}")


@contextlib.contextmanager
def output_lock(folder: Path, name: str) -> Iterator[Path]:
    """Hold the output folder's lock for the duration of the block (removed on exit, also on an error)."""
    lock = acquire(folder, name)
    try:
        yield lock
    finally:
        if _holder(lock).get("pid") == os.getpid():
            lock.unlink(missing_ok=True)

