"""Cache index stage: gather the shards of one cache into a Parquet index and a summary JSON.

The index has one row per entry (key, shard file, the shard's sha256, and what it encodes); it is written
after every shard is complete and verified (its bytes match the sha256 it recorded when written; a damaged or
unreadable shard is deleted, so that a rerun rebuilds it), and the summary last. The summary counts what the shards rebuilt since the previous index
encoded and reused, and which entries disappeared: {encoded, reused, dropped, seconds, items_per_s}.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fluxpipe.data.captions import text_entries
from fluxpipe.errors import FluxpipeError
from fluxpipe.io.atomic import write_text_atomic
from fluxpipe.io.shards import REUSE_DIR, DamagedShard, check_shard, prune_reuse, read_shard_metadata, reuse_name
from fluxpipe.io.tables import read_parquet, write_parquet_atomic

log = logging.getLogger(__name__)
STATE_FILE = "index-state.json"


@dataclass(frozen=True, kw_only=True, slots=True)
class CacheIndexConfig:
    kind: str  # "latents" or "text"
    manifest: Path
    shards: tuple[Path, ...]
    index: Path
    summary: Path


def verify_shards(kind: str, shards: tuple[Path, ...]) -> dict[str, str]:
    """shard name -> sha256 of every shard; damaged ones are deleted and named in one error that says to rerun."""
    digests, damaged = {}, []
    for shard in shards:
        try:
            digests[shard.name] = check_shard(shard)
        except DamagedShard as e:
            damaged.append(str(e))
            shard.unlink(missing_ok=True)
    if damaged:
        stage = "cache-latents" if kind == "latents" else "cache-text"
        raise FluxpipeError(
            f"{len(damaged)} {kind} cache shards were damaged and have been deleted ("
            + "; ".join(damaged)
            + "): rerun the same snakemake command, which rebuilds exactly those "
            f"shards and this index (by hand: fluxpipe {stage} --shard N for each, then cache-index)"
        )
    return digests


def _entries(shards: tuple[Path, ...], digests: dict[str, str]) -> tuple[pd.DataFrame, dict[str, dict]]:
    rows: list[dict[str, object]] = []
    stats: dict[str, dict] = {}
    for shard in shards:
        info, st = read_shard_metadata(shard)
        stats[shard.name] = st.__dict__
        for key, fields in info.items():
            common = {
                "key": key,
                "shard": shard.name,
                "shard_sha256": digests[shard.name],
                **{k: (json.dumps(v) if isinstance(v, list) else v) for k, v in fields.items() if k != "paths"},
            }
            # latents: one row per image path sharing the entry (identical files are encoded once)
            rows += [{**common, "path": p} for p in fields["paths"]] if "paths" in fields else [common]
    return pd.DataFrame(rows), stats


def _check_complete(kind: str, manifest: pd.DataFrame, index: pd.DataFrame) -> None:
    """Every manifest row must find its entries (a stale shard would otherwise surface during training)."""
    if kind == "text":
        wanted = (
            {sha for column in manifest.text_captions for sha, _, _ in text_entries(column)}
            if "text_captions" in manifest
            else set(manifest.caption_sha256)
        )
        missing = wanted - set(index.get("caption_sha256", []))
    else:
        if "kind" in index:  # (Kontext reference entries are listed under their targets' paths: not the targets')
            index = index[index.kind.fillna("") == ""]
        have = set(zip(index.get("path", []), index.get("bucket", []), strict=True))
        missing = {
            p
            for p, w, h in zip(manifest.path, manifest.bucket_w, manifest.bucket_h, strict=True)
            if (p, json.dumps([int(w), int(h)])) not in have
        }
    if missing:
        raise FluxpipeError(
            f"{len(missing)} manifest entries have no {kind} cache entry (e.g. {sorted(missing)[0]}); "
            "the shards are older than the manifest: rerun the cache rule"
        )


def _summary(kind: str, index: pd.DataFrame, stats: dict[str, dict], state: dict) -> dict[str, object]:
    old_builds = state.get("builds", {})
    rebuilt = [name for name, st in stats.items() if old_builds.get(name) != st["build_id"]]
    encoded = sum(stats[n]["encoded"] for n in rebuilt)
    seconds = sum(stats[n]["seconds"] for n in rebuilt)
    dropped = len(set(state.get("keys", [])) - set(index.key)) if state else 0
    return {
        "stage": f"cache_{kind}",
        "entries": len(index),
        "encoded": encoded,
        "reused": len(index) - encoded,
        "dropped": dropped,
        "seconds": round(seconds, 3),
        "items_per_s": round(encoded / seconds, 3) if seconds > 0 else None,
        "shards_rebuilt": sorted(rebuilt),
    }


def run(cfg: CacheIndexConfig) -> dict[str, object]:
    manifest, _ = read_parquet(cfg.manifest)
    index, stats = _entries(cfg.shards, verify_shards(cfg.kind, cfg.shards))
    if index.empty:
        index = pd.DataFrame({c: pd.Series(dtype=str) for c in ("key", "shard", "shard_sha256")})
    _check_complete(cfg.kind, manifest, index)
    state_file = cfg.shards[0].parent / REUSE_DIR / STATE_FILE if cfg.shards else None
    try:
        state = json.loads(state_file.read_text()) if state_file and state_file.is_file() else {}
    except ValueError:
        state = {}
    summary = _summary(cfg.kind, index, stats, state)
    write_parquet_atomic(index, cfg.index, {"fluxpipe.cache_kind": cfg.kind})
    write_text_atomic(cfg.summary, json.dumps(summary, indent=2) + "\n")
    if state_file is not None:
        write_text_atomic(
            state_file, json.dumps({"builds": {n: s["build_id"] for n, s in stats.items()}, "keys": sorted(index.key)})
        )
        prune_reuse(state_file.parent, {reuse_name(s, stats[s.name]["build_id"]) for s in cfg.shards})
    log.info("cache_%s: %s", cfg.kind, json.dumps(summary))
    return summary
