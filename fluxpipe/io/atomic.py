"""Atomic file writes: a temporary file in the same folder, fsync, then one rename over the target.

A reader (or a rerun after SIGKILL) sees either the old file or the complete new one, never a part. A temporary
name carries its writer (``.<target>.<host>-<pid>.<random>.tmp``), so the next write of the same target removes
what a killed writer left (``remove_stale_temps``): only names of this pattern, only of a writer that is gone.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

from fluxpipe.errors import FluxpipeError

log = logging.getLogger(__name__)

HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"
ORPHAN_AGE_S = 3600.0  # a temporary without a checkable writer (another host, older naming) is stale after this
# .<target>.[<host>-<pid>.]<mkstemp's 8 characters | a uuid4 hex>.tmp|.old (the writer tag is absent in older names)
_TEMP = re.compile(
    r"^\.(?P<target>.+?)\.(?:(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.)?"
    r"(?:[a-z0-9_]{8}|[0-9a-f]{32})\.(?:tmp|old)$"
)


def writer_tag() -> str:
    """``<host>-<pid>``: names this process as the writer of a temporary."""
    return f"{HOST}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _age(path: Path) -> float:
    """Seconds since the newest change of ``path`` (a folder: of it or any file directly in it)."""
    times = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        times += [p.lstat().st_mtime for p in path.iterdir()]
    return time.time() - max(times)


def is_stale_temp(path: Path, target_prefix: str) -> bool:
    """Whether ``path`` is a temporary of this project's pattern for a target whose name starts with
    ``target_prefix``, left by a writer that is gone (this host, pid not running; otherwise older than an hour)."""
    m = _TEMP.match(path.name)
    if m is None or not m["target"].startswith(target_prefix):
        return False
    try:
        if m["pid"] is not None and m["host"] == HOST:
            return int(m["pid"]) != os.getpid() and not _alive(int(m["pid"]))
        return _age(path) > ORPHAN_AGE_S
    except OSError:  # gone meanwhile
        return False


def remove_stale_temps(folder: Path, target_prefix: str) -> list[Path]:
    """Remove the stale temporaries (see ``is_stale_temp``) in ``folder``; returns what was removed."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in folder.glob(f".{glob.escape(target_prefix)}*"):
        if is_stale_temp(path, target_prefix):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            log.info("removed %s, left by a killed writer", path)
            removed.append(path)
    return removed


def temp_beside(path: Path) -> str:
    """A new temporary file name beside ``path`` (same file system, so the final rename is atomic); a killed
    earlier writer's temporaries of ``path`` are removed first."""
    remove_stale_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{writer_tag()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


def publish(tmp: str, path: Path) -> None:
    """fsync ``tmp``, give it the permissions a plain open() would (umask applied), rename it to ``path``."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Atomic text write, for reports, summaries and small caches."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def no_space_error(error: BaseException, path: str | Path) -> FluxpipeError | None:
    """The one-line error for a full disk or quota while writing ``path`` (None for any other error).
    safetensors reports it as a SafetensorError whose text carries the OS error."""
    full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    if not (full or "No space left on device" in str(error) or "StorageFull" in str(error)):
        return None
    return FluxpipeError(
        f"{path}: no space left on the device while saving it; free some space and rerun (the "
        "previous files are intact; the unfinished file was removed)"
    )
