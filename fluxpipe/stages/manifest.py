"""Manifest stage: scan the datasets into one Parquet table, the single source for both caches.

One row per (dataset, subset, image): path, sha256 of the bytes (cached by size+mtime), size, width,
height, caption (prefix/suffix applied) and its sha256, repeats, flags, the bucket and resize/crop plan
(spec §3.2), validation split, and the latent and text shard (stable hashes of the image path and of
the caption). ControlNet subsets (``conditioning_data_dir``) pair each image with the conditioning image of
the same stem (spec §7.2): a missing or doubled conditioning image, a conditioning image without a target and,
with buckets, a conditioning image of another size are bad inputs; the row stores the conditioning path and
its sha256 ("" for other datasets). Every bad image, caption or pairing is collected and reported together
(or skipped when asked).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fluxpipe.config.dataset import DatasetConfig, DatasetsConfig, SubsetConfig, preserves_output
from fluxpipe.io.progress import progress
from fluxpipe.data.captions import CaptionAugment, caption_slots, slot_entries
from fluxpipe.data.buckets import BucketSpec, check_spec, make_buckets, plan_resize
from fluxpipe.data.images import BadImage, load_rgb
from fluxpipe.data.sources import Candidate, caption_of, subset_candidates, unpaired_conditioning
from fluxpipe.errors import FluxpipeError, summarize
from fluxpipe.io.atomic import write_text_atomic
from fluxpipe.io.hashing import HashCache, stable_shard
from fluxpipe.io.tables import write_parquet_atomic

log = logging.getLogger(__name__)
MANIFEST_VERSION = 1
SMALL_IMAGE_SIDE = 64  # images with a shorter side are warned about (FLUX latents have 8-pixel cells)


@dataclass(frozen=True, kw_only=True, slots=True)
class ManifestConfig:
    datasets: DatasetsConfig
    out: Path
    latent_shards: int
    text_shards: int
    skip_bad_images: bool = False
    hash_cache: Path | None = None
    workers: int = 2
    masked_loss: bool = False  # --masked_loss: a row with a conditioning image takes its R channel as loss mask
    caption_seed: int = 42  # the training seed: cached caption slot v of an item is its caption of epoch v
    caption_variants: int = 4  # cached caption slots per item of a subset with caption augmentation


def _bucket_spec(ds: DatasetConfig) -> BucketSpec:
    return BucketSpec(
        resolution=ds.resolution,
        enable_bucket=ds.enable_bucket,
        min_bucket_reso=ds.min_bucket_reso,
        max_bucket_reso=ds.max_bucket_reso,
        bucket_reso_steps=ds.bucket_reso_steps,
        bucket_no_upscale=ds.bucket_no_upscale,
    )


def _decoded_size(path: Path, sha: str, decoded: dict[str, list[int]]) -> tuple[int, int]:
    """(width, height) after a full decode (truncated or corrupt files fail here, not during training);
    ``decoded`` maps the sha256 of files decoded once to their size, so unchanged files are not decoded again."""
    if sha not in decoded:
        decoded[sha] = list(load_rgb(path).size)
    width, height = decoded[sha]
    return width, height


def _conditioning_columns(
    c: Candidate, size: tuple[int, int], bucketed: bool, hashes: HashCache, decoded: dict[str, list[int]]
) -> dict[str, str]:
    """``conditioning`` (path) and ``conditioning_sha256`` of a row ("" without one); with buckets the
    conditioning image must have its target's size (spec §7.2)."""
    if c.conditioning is None:
        return {"conditioning": "", "conditioning_sha256": ""}
    sha, _ = hashes.sha256(c.conditioning)
    cond_size = _decoded_size(c.conditioning, sha, decoded)
    if bucketed and cond_size != size:
        raise BadImage(
            f"{c.path}: {size[0]}x{size[1]} but its conditioning image {c.conditioning} is "
            f"{cond_size[0]}x{cond_size[1]} (with enable_bucket both must have the same size; resize "
            f"the conditioning image)"
        )
    return {"conditioning": str(c.conditioning), "conditioning_sha256": sha}


def _describe(c: Candidate, cfg: ManifestConfig, hashes: HashCache, decoded: dict[str, list[int]]) -> dict[str, object]:
    """One manifest row (raises FluxpipeError for a bad image, caption or conditioning image)."""
    ds = cfg.datasets.datasets[c.dataset]
    sub = ds.subsets[c.subset]
    caption = caption_of(c, sub)
    if not c.path.is_file():
        raise BadImage(f"{c.path}: image file not found (check the path or metadata key)")
    sha, _ = hashes.sha256(c.path)
    width, height = _decoded_size(c.path, sha, decoded)
    if min(width, height) < SMALL_IMAGE_SIDE:
        log.warning(
            "%s: only %dx%d pixels; it is upscaled to its bucket and trains as a blur (use images with "
            "sides of %d px or more)",
            c.path,
            width,
            height,
            SMALL_IMAGE_SIDE,
        )
    spec = _bucket_spec(ds)
    try:
        plan = plan_resize(width, height, spec, make_buckets(spec) if spec.enable_bucket else None)
    except ValueError as e:
        raise BadImage(f"{c.path}: {width}x{height} cannot be bucketed ({e})") from e
    cond = _conditioning_columns(c, (width, height), ds.enable_bucket, hashes, decoded)
    if cfg.masked_loss and cond["conditioning"]:
        mask_size = _decoded_size(Path(cond["conditioning"]), cond["conditioning_sha256"], decoded)
        if mask_size != (width, height):
            raise BadImage(
                f"{cond['conditioning']}: the --masked_loss mask is {mask_size[0]}x{mask_size[1]} but its image "
                f"{c.path} is {width}x{height}; give the mask its image's size"
            )
    return {
        "path": str(c.path),
        "dataset": c.dataset,
        "subset": c.subset,
        "sha256": sha,
        "bytes": c.path.stat().st_size,
        "width": width,
        "height": height,
        "caption": caption,
        "caption_sha256": hashlib.sha256(caption.encode("utf-8")).hexdigest(),
        "repeats": sub.num_repeats,
        "is_reg": sub.is_reg,
        "caption_drop_every": sub.caption_dropout_every_n_epochs,
        "preserve": preserves_output(sub),
        "flip_aug": sub.flip_aug,
        "bucket_w": plan.bucket[0],
        "bucket_h": plan.bucket[1],
        "resized_w": plan.resized[0],
        "resized_h": plan.resized[1],
        "crop_left": plan.crop_left,
        "crop_top": plan.crop_top,
        "upscaled": plan.upscale,
        "resize_interpolation": sub.resize_interpolation or "",
        **cond,
        "mask_source": "conditioning" if cfg.masked_loss and cond.get("conditioning") else _alpha(sub),
    }


def _alpha(sub: SubsetConfig) -> str:
    return "alpha" if sub.alpha_mask else ""


def _assign_split(rows: list[dict[str, object]], datasets: DatasetsConfig) -> None:
    """Deterministic, disjoint validation split per dataset (seeded hash order, not list order)."""
    for row in rows:
        row["split"] = "train"
    for di, ds in enumerate(datasets.datasets):
        if ds.validation_split <= 0:
            continue
        mine = [r for r in rows if r["dataset"] == di and not r["is_reg"]]
        seed = ds.validation_seed if ds.validation_seed is not None else 0
        mine.sort(key=lambda r: hashlib.sha256(f"{seed}:{r['sha256']}:{r['path']}".encode()).hexdigest())
        for row in mine[: round(len(mine) * ds.validation_split)]:
            row["split"] = "val"


def _caption_slots(row: dict[str, object], cfg: ManifestConfig) -> None:
    """The captions a training row trains on (``fluxpipe.data.captions.caption_slots``; validation rows keep
    their caption), each with its text shard, as the ``text_captions`` column."""
    sub = cfg.datasets.datasets[int(str(row["dataset"]))].subsets[int(str(row["subset"]))]
    aug = CaptionAugment.of(sub)
    caption, train = str(row["caption"]), row["split"] == "train"
    slots = caption_slots(caption, aug, cfg.caption_seed, f"{row['dataset']}:{row['path']}", cfg.caption_variants)
    if not train:
        slots, row["caption_drop_every"] = [], 0
    row["caption_slots"] = json.dumps(slots, ensure_ascii=False)
    row["text_captions"] = slot_entries(
        caption, slots, int(str(row["caption_drop_every"])), lambda sha: stable_shard(sha, cfg.text_shards)
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def scan(cfg: ManifestConfig) -> tuple[list[dict[str, object]], list[str]]:
    """All manifest rows and all problems ('file: reason')."""
    candidates, problems = [], []
    for di, ds in enumerate(cfg.datasets.datasets):
        check_spec(_bucket_spec(ds))
        for si, sub in enumerate(ds.subsets):
            if sub.num_repeats < 1:
                log.info("datasets[%d].subsets[%d]: num_repeats < 1, subset left out", di, si)
                continue
            found, bad = subset_candidates(di, si, sub)
            candidates += found
            problems += bad
    problems += unpaired_conditioning(cfg.datasets)

    checked_file = cfg.out.with_name(cfg.out.name + ".decoded.json")
    decoded = _read_json(checked_file)
    hashes = HashCache(cfg.hash_cache)

    def describe(c: Candidate) -> dict[str, object] | str:
        try:
            return _describe(c, cfg, hashes, decoded)
        except FluxpipeError as e:
            return str(e)

    with ThreadPoolExecutor(max_workers=cfg.workers) as pool:
        results = list(
            progress(pool.map(describe, candidates), total=len(candidates), desc="manifest", unit="img", mininterval=2)
        )
    hashes.save()
    write_text_atomic(checked_file, json.dumps(decoded, sort_keys=True))
    rows = [r for r in results if isinstance(r, dict)]
    problems += [r for r in results if isinstance(r, str)]
    return rows, problems


def run(cfg: ManifestConfig) -> pd.DataFrame:
    start = time.perf_counter()
    rows, problems = scan(cfg)
    if problems and not cfg.skip_bad_images:
        raise FluxpipeError(
            f"{len(problems)} bad dataset files: {summarize(problems, 20)}; fix or remove them, "
            "or set cache.skip_bad_images: true to leave them out"
        )
    for problem in problems:
        log.warning("left out: %s", problem)
    if not rows:
        raise FluxpipeError(
            f"the dataset ({cfg.datasets.source}) has no usable images: check image_dir and the "
            "image extensions (.png .jpg .jpeg .webp .bmp)"
        )
    _assign_split(rows, cfg.datasets)
    for row in rows:
        row["latent_shard"] = stable_shard(str(row["path"]), cfg.latent_shards)
        row["text_shard"] = stable_shard(str(row["caption_sha256"]), cfg.text_shards)
        _caption_slots(row, cfg)
    table = pd.DataFrame(rows).sort_values(["dataset", "subset", "path"], kind="stable").reset_index(drop=True)
    write_parquet_atomic(
        table, cfg.out, {"fluxpipe.manifest_version": str(MANIFEST_VERSION), "fluxpipe.left_out": json.dumps(problems)}
    )
    buckets = Counter(f"{w}x{h}" for w, h in zip(table.bucket_w, table.bucket_h, strict=True))
    log.info(
        "manifest: %d images (%d left out) in %.1f s; buckets %s",
        len(table),
        len(problems),
        time.perf_counter() - start,
        dict(sorted(buckets.items())),
    )
    return table
