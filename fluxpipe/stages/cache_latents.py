"""Latent cache stage: AE posterior moments of every manifest image, one shard job per latent shard.

Each entry is keyed by (image sha256, bucket, resize, crop, flip, AE file sha256, encode and storage
dtype, format version) and holds ``mean`` and ``logvar`` [16, H/8, W/8] of the AE posterior before
FLUX's scale/shift, so training can draw fresh noise every epoch. Unchanged entries come from the
previous shards (.reuse), new ones are encoded batched by bucket while threads decode the next images.

Kontext runs (``references``) also cache each paired row's reference image (its ``conditioning`` column) as a
second entry kind, ``reference``: keyed the same way by the reference's sha256 (plus ``kind``), resized and
cropped exactly as its target (so the pair stays pixel-aligned) and flipped with it; its index rows name the
target images it serves. Rows with a loss mask (``mask_source``: a subset's alpha_mask, or --masked_loss with a
conditioning image) also cache it, kind ``mask:alpha`` / ``mask:conditioning``, on the latent grid.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from fluxpipe.io.progress import progress
from fluxpipe.data.images import load_rgb, resize_and_crop, to_tensor
from fluxpipe.data.masks import cached_mask, mask_pixels
from fluxpipe.io.checkpoints import load_ae
from fluxpipe.io.hashing import cached_sha256
from fluxpipe.io.shards import ShardStats, build_shard, content_key
from fluxpipe.io.tables import read_parquet
from fluxpipe.parallel.devices import encode_dtype

log = logging.getLogger(__name__)
LATENT_CACHE_VERSION = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class CacheLatentsConfig:
    manifest: Path
    ae: Path
    out: Path
    shard: int
    batch_size: int = 4
    dtype: str = "float32"
    device: str = "cpu"
    decode_workers: int = 2
    hash_cache: Path | None = None
    references: bool = False  # Kontext: cache the rows' reference (conditioning) images too


@dataclass(frozen=True)
class LatentEntry:
    key: str
    path: str  # the image that is encoded
    paths: tuple[str, ...]  # every manifest image with these bytes and this bucket/crop/flip (identical files)
    bucket: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int]
    flip: bool
    interpolation: str = ""  # the subset's resize_interpolation ("": area when shrinking, lanczos when enlarging)
    kind: str = ""  # "": a target image; "reference": a Kontext reference (path), ``paths`` = its targets;
    # "mask:alpha" / "mask:conditioning": the loss mask of ``paths`` (no AE: ``mask`` [H/8, W/8] in [0, 1])
    image_size: tuple[int, int] = (0, 0)  # the target image's (W, H)


def _sources(r: Any, references: bool) -> list[tuple[str, str, str]]:
    """(kind, image path, image sha256) of what a manifest row caches: its image, its reference if asked, and its
    loss mask ("mask:alpha" from the image, "mask:conditioning" from the conditioning image) if it has one."""
    out = [("", str(r.path), str(r.sha256))]
    conditioning = getattr(r, "conditioning", None)  # (a column of Kontext and mask manifests only)
    if references and conditioning:
        out.append(("reference", str(r.conditioning), str(r.conditioning_sha256)))
    source = getattr(r, "mask_source", "") or ""
    if source == "alpha":
        out.append(("mask:alpha", str(r.path), str(r.sha256)))
    elif source == "conditioning":
        out.append(("mask:conditioning", str(r.conditioning), str(r.conditioning_sha256)))
    return out


def latent_entries(rows: pd.DataFrame, ae_sha: str, cfg: CacheLatentsConfig) -> list[LatentEntry]:
    """Entries for the manifest rows (two per image with flip_aug; a reference kind too with ``references``),
    unique by key, in manifest order."""
    entries: dict[str, LatentEntry] = {}
    for r in rows.itertuples(index=False):
        for kind, path, sha in _sources(r, cfg.references):
            for flip in (False, True) if r.flip_aug else (False,):
                fields = {
                    "v": LATENT_CACHE_VERSION,
                    "image": sha,
                    "bucket": [r.bucket_w, r.bucket_h],
                    "resized": [r.resized_w, r.resized_h],
                    "crop": [r.crop_left, r.crop_top],
                    "flip": flip,
                    "ae": ae_sha,
                    "encode": str(encode_dtype(cfg.device)),
                    "store": cfg.dtype,
                }
                interpolation = getattr(r, "resize_interpolation", "") or ""
                if interpolation:  # (absent from the key when unset: existing caches stay valid)
                    fields["interpolation"] = interpolation
                if kind:
                    fields["kind"] = kind
                key = content_key(**fields)
                old = entries.get(key)
                entries[key] = LatentEntry(
                    image_size=(int(r.width), int(r.height)),
                    key=key,
                    path=old.path if old else path,
                    paths=(*(old.paths if old else ()), r.path),
                    bucket=(r.bucket_w, r.bucket_h),
                    resized=(r.resized_w, r.resized_h),
                    crop=(r.crop_left, r.crop_top),
                    flip=flip,
                    interpolation=interpolation,
                    kind=kind,
                )
    return list(entries.values())


def prepare(entry: LatentEntry) -> torch.Tensor:
    """Decode, resize, crop (and flip) one image: [3, H, W] in [-1, 1]."""
    image = resize_and_crop(
        load_rgb(Path(entry.path)),
        entry.resized,
        entry.crop[0],
        entry.crop[1],
        entry.bucket,
        entry.interpolation or None,
    )
    x = to_tensor(image)
    return x.flip(-1) if entry.flip else x


def _stacked(batch: list[LatentEntry]) -> torch.Tensor:
    return torch.stack([prepare(e) for e in batch])


def batches(entries: list[LatentEntry], batch_size: int) -> Iterator[list[LatentEntry]]:
    """Batches of one bucket each (images in a batch must share a size)."""
    by_bucket: dict[tuple[int, int], list[LatentEntry]] = {}
    for e in entries:
        by_bucket.setdefault(e.bucket, []).append(e)
    for bucket in sorted(by_bucket):
        group = by_bucket[bucket]
        for i in range(0, len(group), batch_size):
            yield group[i : i + batch_size]


def masks(entries: list[LatentEntry]) -> dict[str, dict[str, torch.Tensor]]:
    """The loss-mask entries: ``mask`` [H/8, W/8] float32 (``fluxpipe.data.masks``)."""
    out = {}
    for e in entries:
        pixels = mask_pixels(
            e.kind.split(":")[1], Path(e.path), e.image_size, e.resized, e.crop, e.bucket, e.interpolation or None
        )
        out[e.key] = {"mask": cached_mask(pixels, e.flip).contiguous()}
    return out


@torch.no_grad()
def encode(entries: list[LatentEntry], cfg: CacheLatentsConfig) -> dict[str, dict[str, torch.Tensor]]:
    """Encode ``entries`` with the AE (loss masks without it); image decoding runs in threads one batch ahead
    of the encoder."""
    out = masks([e for e in entries if e.kind.startswith("mask:")])
    entries = [e for e in entries if not e.kind.startswith("mask:")]
    if not entries:
        return out
    dtype = encode_dtype(cfg.device)
    ae = load_ae(cfg.ae, dtype=dtype, device=cfg.device)
    store = getattr(torch, cfg.dtype)
    todo = list(batches(entries, cfg.batch_size))
    with (
        ThreadPoolExecutor(max_workers=cfg.decode_workers) as pool,
        progress(total=len(entries), desc=f"latents shard {cfg.shard}", unit="img", mininterval=2) as bar,
    ):
        pending = [pool.submit(_stacked, b) for b in todo[:2]]
        for i, batch in enumerate(todo):
            images = pending[i].result()
            if i + 2 < len(todo):
                pending.append(pool.submit(_stacked, todo[i + 2]))
            moments = ae.encoder(images.to(cfg.device, dtype)).float().cpu()
            mean, logvar = moments.chunk(2, dim=1)
            for j, e in enumerate(batch):
                out[e.key] = {"mean": mean[j].to(store).clone(), "logvar": logvar[j].to(store).clone()}
            bar.update(len(batch))
    return out


def run(cfg: CacheLatentsConfig) -> ShardStats:
    """Build one latent shard: reuse what exists, encode the rest, write atomically."""
    start = time.perf_counter()
    table, _ = read_parquet(cfg.manifest)
    rows = table[table.latent_shard == cfg.shard]
    ae_sha, _ = cached_sha256(cfg.ae, cfg.hash_cache)
    entries = {e.key: e for e in latent_entries(rows, ae_sha, cfg)}
    info = {
        k: {"paths": list(e.paths), "bucket": list(e.bucket), "flip": e.flip, **({"kind": e.kind} if e.kind else {})}
        for k, e in entries.items()
    }
    stats = build_shard(cfg.out, info, lambda keys: encode([entries[k] for k in keys], cfg))
    log.info(
        "latent shard %d: %d entries, %d encoded (%.1f img/s), %d reused, %d dropped, %.1f s",
        cfg.shard,
        len(entries),
        stats.encoded,
        stats.encoded / max(stats.seconds, 1e-9),
        stats.reused,
        stats.dropped,
        time.perf_counter() - start,
    )
    return stats
