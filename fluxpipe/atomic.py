"""Atomic file writes: a temporary file in the same folder, fsync, then one rename over the target.

A reader (or a rerun after SIGKILL) sees either the old file or the complete new one, never a part.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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
