"""Streamed sha256 of (large) files, cached by (size, mtime) so a 24 GB model is hashed once.

The cache is a small JSON file {absolute path: {size, mtime_ns, sha256}}; an entry counts only while
the file's size and modification time are unchanged. Writes are atomic (temp + rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from fluxpipe.atomic import write_text_atomic

CHUNK = 16 * 1024 * 1024


def default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fluxpipe" / "sha256.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _load_cache(cache: Path) -> dict[str, dict]:
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # a missing or damaged cache only costs a rehash


class HashCache:
    """sha256 of many files with one read and one write of the cache file (thread-safe)."""

    def __init__(self, cache: Path | None = None):
        self.path = Path(cache) if cache else default_cache_path()
        self.entries = _load_cache(self.path)
        self.new: dict[str, dict] = {}
        self._lock = threading.Lock()

    def sha256(self, path: str | Path) -> tuple[str, bool]:
        """(sha256 hex, whether it came from the cache) for ``path``."""
        path = Path(path).resolve()
        stat = path.stat()
        entry = self.new.get(str(path)) or self.entries.get(str(path))
        if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            return entry["sha256"], True
        digest = sha256_file(path)
        with self._lock:
            self.new[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        return digest, False

    def save(self) -> None:
        """Merge the new entries into the cache file (re-read first: another process may have added some)."""
        if not self.new:
            return
        entries = {p: e for p, e in {**_load_cache(self.path), **self.new}.items() if os.path.exists(p)}
        try:
            write_text_atomic(self.path, json.dumps(entries, indent=1, sort_keys=True))
        except OSError:
            pass  # a read-only cache location only costs a rehash next time


def cached_sha256(path: str | Path, cache: Path | None = None) -> tuple[str, bool]:
    """(sha256 hex, whether it came from the cache) for one file."""
    hashes = HashCache(cache)
    result = hashes.sha256(path)
    hashes.save()
    return result
