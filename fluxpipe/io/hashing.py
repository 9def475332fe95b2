"""Streamed sha256 of (large) files, cached by file identity so a 24 GB model is hashed once.

The cache is a small JSON file {absolute path: {size, mtime_ns, ctime_ns, inode, device, sha256, ...}}; an
entry counts only while all five stat fields are unchanged. Size and mtime alone can be restored after an
in-place edit (``cp -p``, ``rsync -a``, ``touch -r``), but the inode change time (ctime) is set by the kernel
on every write and every utime call and cannot be set back by a user; inode and device tell a replaced file
from the original. What stays trusted: a file whose bytes change while its ctime stays the same (only by
changing the system clock or editing the raw block device), and a change within one tick of the file
system's clock after it was hashed. For safetensors model files, ``scan_safetensors`` counts NaN/Inf values
of every float tensor in the same streamed read as the sha256, and the cache keeps that count with the hash.
Writes are atomic (temp + rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import zlib
from pathlib import Path

from typing import TYPE_CHECKING

from fluxpipe.io.atomic import write_text_atomic

if TYPE_CHECKING:  # torch is imported by scan_safetensors only: hashing a dataset's images needs no torch
    import torch

CHUNK = 16 * 1024 * 1024
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})  # safetensors' float dtype codes


def _float_dtype(code: str) -> torch.dtype:
    from fluxpipe.io.safetensors_file import DTYPES  # imports torch: only when a file is scanned

    return DTYPES[code]


def default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fluxpipe" / "sha256.json"


def file_identity(stat: os.stat_result) -> dict[str, int]:
    """What a cache entry is keyed on: no user tool can restore all of these after changing the bytes."""
    return {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "ctime_ns": stat.st_ctime_ns,
        "inode": stat.st_ino,
        "device": stat.st_dev,
    }


def stable_shard(item: str, num_shards: int) -> int:
    """Shard of an item by a stable hash of its identity (not its position in a list)."""
    return zlib.crc32(item.encode("utf-8")) % num_shards


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _count_nonfinite(data: memoryview, dtype: torch.dtype) -> int:
    """NaN/Inf values in raw little-endian bytes of ``dtype`` (fp8 upcast to float32 first)."""
    import torch

    if not len(data):
        return 0
    t = torch.frombuffer(data, dtype=torch.uint8).view(dtype)
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = t.float()
    return int((~torch.isfinite(t)).sum())


def scan_safetensors(
    path: Path, data_start: int, tensors: dict[str, tuple[str, int, int]]
) -> tuple[str, dict[str, int]]:
    """(sha256 of the whole file, {tensor: NaN/Inf count} for the float tensors that have any), in ONE streamed
    read. ``tensors``: name -> (dtype code, start, stop) with offsets relative to ``data_start``, as in the header.
    A value that straddles two read chunks is carried over, so any offsets work."""
    ranges = sorted(
        (data_start + a, data_start + b, name, _float_dtype(code))
        for name, (code, a, b) in tensors.items()
        if code in FLOAT_CODES and b > a
    )
    counts: dict[str, int] = {}
    carry: dict[str, bytes] = {}
    digest, buf, pos = hashlib.sha256(), bytearray(CHUNK), 0
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            view = memoryview(buf)[:n]
            digest.update(view)
            for start, stop, name, dtype in ranges:
                lo, hi = max(start, pos), min(stop, pos + n)
                if lo >= hi:
                    continue
                piece = view[lo - pos : hi - pos]
                if name in carry:
                    piece = memoryview(bytearray(carry.pop(name)) + piece)
                size = dtype.itemsize
                usable = len(piece) // size * size
                if usable < len(piece):
                    carry[name] = bytes(piece[usable:])
                bad = _count_nonfinite(piece[:usable], dtype)
                if bad:
                    counts[name] = counts.get(name, 0) + bad
            pos += n
    return digest.hexdigest(), counts


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

    def _entry(self, path: Path, identity: dict[str, int], field: str) -> dict | None:
        entry = self.new.get(str(path)) or self.entries.get(str(path))
        if entry and field in entry and all(entry.get(k) == v for k, v in identity.items()):
            return entry
        return None

    def _store(self, path: Path, identity: dict[str, int], **facts: object) -> None:
        with self._lock:
            self.new[str(path)] = {**identity, **facts}

    def sha256(self, path: str | Path) -> tuple[str, bool]:
        """(sha256 hex, whether it came from the cache) for ``path``."""
        path = Path(path).resolve()
        identity = file_identity(path.stat())
        entry = self._entry(path, identity, "sha256")
        if entry:
            return entry["sha256"], True
        digest = sha256_file(path)
        self._store(path, identity, sha256=digest)
        return digest, False

    def scan(
        self, path: str | Path, data_start: int, tensors: dict[str, tuple[str, int, int]]
    ) -> tuple[str, dict[str, int], bool]:
        """(sha256, {tensor: NaN/Inf count}, whether it came from the cache) of a safetensors file."""
        path = Path(path).resolve()
        identity = file_identity(path.stat())
        entry = self._entry(path, identity, "nonfinite")
        if entry:
            return entry["sha256"], dict(entry["nonfinite"]), True
        digest, counts = scan_safetensors(path, data_start, tensors)
        self._store(path, identity, sha256=digest, nonfinite=counts)
        return digest, counts, False

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


def tokenizer_identity(folder: Path | None, hub_id: str, hash_cache: Path | None) -> str:
    """A hash of the tokenizer's files (or the hub id when it comes from the hub)."""
    if folder is None:
        return hub_id
    digest = hashlib.sha256()
    for f in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        digest.update(f.name.encode() + cached_sha256(f, hash_cache)[0].encode())
    return digest.hexdigest()
