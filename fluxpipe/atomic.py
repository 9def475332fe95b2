"""Atomic file writes: a temporary file in the same folder, fsync, then one rename over the target.

A reader (or a rerun after SIGKILL) sees either the old file or the complete new one, never a part.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from fluxpipe.errors import FluxpipeError


def temp_beside(path: Path) -> str:
    """A new temporary file name beside ``path`` (same file system, so the final rename is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    return FluxpipeError(f"{path}: no space left on the device while saving it; free some space and rerun (the "
                         "previous files are intact; the unfinished file was removed)")
