"""The trainers' output folder: checked before any model loads, and held by one run at a time.

``check_output_dir`` refuses a folder that is a file, cannot be created or is not writable (one line each).
``output_lock`` takes ``<output_dir>/.<output_name>.lock`` (JSON: pid, host, start time) with an exclusive flock:
a second run on the same folder and name is refused naming the holder; the kernel drops the flock when its
process dies, so a lock file left by a killed run is taken over (with a warning); the file is removed when the run
ends (also on an error).
"""

from __future__ import annotations

import contextlib
import fcntl
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
        raise FluxpipeError(
            f"--output_dir {folder}: cannot be created ({e.strerror}); give a folder you can write to"
        ) from None
    probe = folder / f".fluxpipe-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FluxpipeError(
            f"--output_dir {folder}: cannot write into it ({e.strerror}); fix its permissions or give another folder"
        ) from None


def _holder(lock: Path) -> dict[str, object]:
    try:
        data = json.loads(lock.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _open_locked(lock: Path) -> int | None:
    """An fd of ``lock`` holding an exclusive flock, or None if another process holds it. The lock goes with the
    process (also on SIGKILL or a wall-time kill, on another host too when the file system supports flock); the
    inode check covers a file unlinked by its previous holder between our open and our flock."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as e:  # a file system without flock: go on, unlocked, but say so
            log.warning("%s: cannot lock on this file system (%s); not guarded against a second run", lock, e.strerror)
            return fd
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def acquire(folder: Path, name: str) -> tuple[Path, int]:
    """Take the lock of (folder, name) or raise FluxpipeError naming who holds it; (lock path, its fd)."""
    lock = folder / f".{name}.lock"
    fd = _open_locked(lock)
    held = _holder(lock)
    if fd is None:
        raise FluxpipeError(
            f"--output_dir {folder}: another run writes {name} there (pid {held.get('pid', '?')} on host "
            f"{held.get('host', '?')}, since {held.get('started', '?')}; lock {lock}): wait for it, or use another "
            "--output_dir/--output_name"
        )
    if held.get("pid") not in (None, os.getpid()):
        log.warning(
            "%s: taking over the lock of pid %s on %s, which has ended", lock, held.get("pid"), held.get("host", "?")
        )
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return lock, fd


@contextlib.contextmanager
def output_lock(folder: Path, name: str) -> Iterator[Path]:
    """Hold the output folder's lock for the duration of the block (removed on exit, also on an error)."""
    lock, fd = acquire(folder, name)
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)
