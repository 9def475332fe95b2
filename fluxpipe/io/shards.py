"""Content-addressed cache shards: one safetensors file per shard, entries keyed by a content hash.

A shard holds tensors named ``<key>.<part>`` (e.g. ``<key>.mean``) and, in its metadata, a JSON
``fluxpipe.entries`` {key: info} and ``fluxpipe.stats`` (encoded / reused / dropped / seconds / build id).
Shards are written atomically (temp + rename) and then hard-linked into a ``.reuse`` folder beside them
as ``<shard>.<build id>.safetensors``, which Snakemake never deletes: any later shard build takes unchanged
entries from there instead of encoding them again, so a rerun encodes exactly what changed and a killed run
loses nothing finished. Older generations stay until the index stage has gathered the new shards (so a
re-sharding finds every old entry), then it prunes them.

Every shard records ``fluxpipe.sha256``: the sha256 of its header's meaning and its data bytes, computed from
the tensors as they are written. ``check_shard`` recomputes it (one streamed read); the index stage checks
every shard it gathers, training every shard it opens, and a build checks each .reuse file before taking
entries from it (a hard link shares the damaged bytes of its shard): a damaged one is deleted, never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from fluxpipe.errors import FluxpipeError
from fluxpipe.io.hashing import stable_shard  # noqa: F401 - part of this module's interface
from fluxpipe.io.safetensors_file import content_digest, read_header, save_safetensors_streaming

REUSE_DIR = ".reuse"
DIGEST_KEY = "fluxpipe.sha256"


class DamagedShard(FluxpipeError):
    """A shard whose bytes are not those written (or that cannot be read as a shard at all)."""


def content_key(**fields: object) -> str:
    """sha256 hex of the canonical JSON of ``fields`` (the identity of one cache entry)."""
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ShardStats:
    encoded: int
    reused: int
    dropped: int
    seconds: float
    build_id: str


def reuse_dir(shard_path: Path) -> Path:
    return shard_path.parent / REUSE_DIR


def reuse_name(shard_path: Path, build_id: str) -> str:
    return f"{shard_path.stem}.{build_id}{shard_path.suffix}"


def shard_of_reuse_file(path: Path) -> str:
    """'shard-000.<build id>.safetensors' -> 'shard-000.safetensors'."""
    stem = path.name.split(".")[0]
    return f"{stem}{path.suffix}"


def check_shard(path: Path) -> str:
    """The shard's digest, recomputed from its bytes and equal to the one it recorded; else DamagedShard."""
    try:
        recorded, actual = content_digest(path, DIGEST_KEY)
    except (FluxpipeError, OSError) as e:  # missing, truncated, not safetensors
        raise DamagedShard(f"{path}: unreadable ({e})") from e
    if recorded is None:
        raise DamagedShard(f"{path}: records no sha256 (written by an older fluxpipe)")
    if recorded != actual:
        raise DamagedShard(f"{path}: its bytes do not match the sha256 recorded when it was written (damaged)")
    return actual


class ReusePool:
    """Entries of previously built shards (every generation in the .reuse folder), found by key."""

    def __init__(self, folder: Path):
        self.where: dict[str, list[Path]] = {}  # key -> reuse files holding it, oldest first
        self.previous: dict[str, set[str]] = {}  # shard file name -> keys of its newest earlier build
        files = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns) if folder.is_dir() else []
        for path in files:  # oldest first, so `previous` ends with the newest build of each shard
            try:
                keys = set(json.loads(read_header(path).metadata.get("fluxpipe.entries", "{}")))
            except Exception:  # a damaged reuse file only costs re-encoding
                continue
            self.previous[shard_of_reuse_file(path)] = keys
            for key in keys:
                self.where.setdefault(key, []).append(path)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def _drop(self, path: Path) -> None:
        """Forget (and delete) a damaged reuse file."""
        path.unlink(missing_ok=True)
        for key in [k for k, paths in self.where.items() if path in paths]:
            self.where[key].remove(path)
            if not self.where[key]:
                del self.where[key]

    def load(self, keys: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """key -> {part: tensor} for those of ``keys`` found in a reuse file that passes ``check_shard``; a
        damaged file is deleted and its keys looked up in the other generations (else left to encode)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        checked: set[Path] = set()
        todo = [k for k in keys if k in self.where]
        while todo:
            by_file: dict[Path, set[str]] = {}
            for key in todo:
                by_file.setdefault(self.where[key][0], set()).add(key)
            todo = []
            for path, wanted in by_file.items():
                try:
                    if path not in checked:
                        check_shard(path)
                        checked.add(path)
                except DamagedShard:
                    self._drop(path)
                    todo += [k for k in wanted if k in self.where]
                    continue
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        key, _, part = name.partition(".")
                        if key in wanted:
                            out.setdefault(key, {})[part] = f.get_tensor(name)
        return out


def write_shard(
    path: Path,
    entries: Mapping[str, Mapping[str, torch.Tensor]],
    info: Mapping[str, object],
    stats: ShardStats,
    extra_metadata: Mapping[str, str] | None = None,
) -> None:
    """Write the shard atomically, then refresh its hard link in the .reuse folder."""
    tensors = {f"{key}.{part}": t for key, parts in entries.items() for part, t in parts.items()}
    metadata = {
        "fluxpipe.entries": json.dumps(info, sort_keys=True),
        "fluxpipe.stats": json.dumps(stats.__dict__),
        **(extra_metadata or {}),
    }
    save_safetensors_streaming(tensors, path, metadata, digest_key=DIGEST_KEY)
    folder = reuse_dir(path)
    folder.mkdir(exist_ok=True)
    tmp = folder / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        os.link(path, tmp)
    except OSError:  # file systems without hard links: a copy
        shutil.copyfile(path, tmp)
    os.replace(tmp, folder / reuse_name(path, stats.build_id))


def prune_reuse(folder: Path, keep: set[str]) -> None:
    """Delete the reuse files not named in ``keep`` (older generations, shards that no longer exist)."""
    for path in folder.glob("*.safetensors"):
        if path.name not in keep:
            path.unlink(missing_ok=True)


def build_shard(
    out: Path,
    info: Mapping[str, Mapping[str, object]],
    encode: Callable[[list[str]], dict[str, dict[str, torch.Tensor]]],
) -> ShardStats:
    """Write shard ``out`` holding the entries ``info`` (key -> facts): entries found in the .reuse pool are
    copied, the others come from ``encode(missing keys)``; the stats count both and what the shard lost."""
    pool = ReusePool(reuse_dir(out))
    tensors = pool.load([k for k in info if k in pool])
    reused = [k for k in info if k in tensors]
    missing = [k for k in info if k not in tensors]
    start = time.perf_counter()
    tensors.update(encode(missing))
    seconds = time.perf_counter() - start
    stats = ShardStats(
        encoded=len(missing),
        reused=len(reused),
        dropped=len(pool.previous.get(out.name, set()) - set(info)),
        seconds=round(seconds, 3),
        build_id=new_build_id(),
    )
    write_shard(out, tensors, info, stats)
    return stats


def read_shard_metadata(path: Path) -> tuple[dict[str, dict], ShardStats]:
    meta = read_header(path).metadata
    return json.loads(meta["fluxpipe.entries"]), ShardStats(**json.loads(meta["fluxpipe.stats"]))


def new_build_id() -> str:
    return uuid.uuid4().hex
