"""The ss_* metadata of a trained LoRA that describe the run's data and step plan, as the reference writes them
(spec §5.7): with a dataset config ``ss_datasets`` (a JSON list, one object per dataset with its subsets),
``ss_tag_frequency`` and ``ss_dataset_dirs``; in folder mode the flat keys (``ss_resolution``,
``ss_enable_bucket``, ``ss_bucket_info`` ...). Figures are of the training split, repeats counted as the
reference counts them (images x num_repeats for the image totals and bucket counts, each image once for tags)."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import pandas as pd

from fluxpipe.config.dataset import DatasetConfig, DatasetsConfig, SubsetConfig


def run_figures(batches_per_epoch: int, total_steps: int, epochs: int) -> dict[str, str]:
    """The step plan's keys: what the run does, not the flags' defaults."""
    return {
        "ss_num_batches_per_epoch": str(batches_per_epoch),
        "ss_max_train_steps": str(total_steps),
        "ss_num_epochs": str(epochs),
    }


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """Comma-separated tags of each caption, stripped and lower-cased, counted once per image."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(t.strip().lower() for t in caption.split(",") if t.strip())
    return dict(counts)


def bucket_info(rows: pd.DataFrame, enable_bucket: bool) -> dict[str, Any]:
    """{"buckets": {i: {"resolution": [w, h], "count": images x repeats}}, "mean_img_ar_error": ...}."""
    counts: Counter[tuple[int, int]] = Counter()
    for w, h, n in zip(rows.bucket_w, rows.bucket_h, rows.repeats, strict=True):
        counts[(int(w), int(h))] += int(n)
    buckets = {i: {"resolution": list(r), "count": counts[r]} for i, r in enumerate(sorted(counts))}
    errors = (rows.bucket_w / rows.bucket_h - rows.width / rows.height).abs()
    return {"buckets": buckets, "mean_img_ar_error": float(errors.mean()) if enable_bucket and len(rows) else 0.0}


def _subset_name(sub: SubsetConfig) -> str | None:
    path = sub.image_dir if sub.metadata_file is None else sub.metadata_file
    return os.path.basename(str(path).rstrip("/")) if path else None


def _subset(sub: SubsetConfig, rows: pd.DataFrame, dreambooth: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "img_count": len(rows),
        "num_repeats": sub.num_repeats,
        "color_aug": bool(sub.color_aug),
        "flip_aug": bool(sub.flip_aug),
        "random_crop": bool(sub.random_crop),
        "shuffle_caption": bool(sub.shuffle_caption),
        "keep_tokens": sub.keep_tokens,
        "keep_tokens_separator": sub.keep_tokens_separator,
        "secondary_separator": sub.secondary_separator,
        "enable_wildcard": bool(sub.enable_wildcard),
        "caption_prefix": sub.caption_prefix,
        "caption_suffix": sub.caption_suffix,
        "resize_interpolation": sub.resize_interpolation,
    }
    if sub.image_dir:
        out["image_dir"] = os.path.basename(str(sub.image_dir).rstrip("/"))
    if dreambooth:
        out |= {"class_tokens": sub.class_tokens, "is_reg": sub.is_reg}
    else:
        out["metadata_file"] = _subset_name(sub)
    return out


def _dataset(ds: DatasetConfig, rows: pd.DataFrame, dirs: dict[str, dict], tags: dict[str, dict]) -> dict[str, Any]:
    """One entry of ss_datasets; ``dirs`` and ``tags`` gather ss_dataset_dirs and ss_tag_frequency."""
    dreambooth = all(sub.metadata_file is None for sub in ds.subsets)
    subsets: list[dict[str, Any]] = []
    own_tags: dict[str, dict[str, int]] = {}
    for si, sub in enumerate(ds.subsets):
        mine = rows[rows.subset == si]
        subsets.append(_subset(sub, mine, dreambooth))
        name = _subset_name(sub)
        if name is None or sub.is_reg:
            continue
        own_tags.setdefault(name, tag_frequency(list(mine.caption)))
        key, i = name, 2
        while key in dirs:  # a folder used twice: "name (2)", as the reference
            key, i = f"{name} ({i})", i + 1
        dirs[key] = {"n_repeats": sub.num_repeats, "img_count": len(mine)}
    for name, freq in own_tags.items():
        tags.setdefault(name, freq)
    images = int((rows.repeats * ~rows.is_reg.astype(bool)).sum())
    return {
        "is_dreambooth": dreambooth,
        "batch_size_per_device": ds.batch_size,
        "num_train_images": images,
        "num_reg_images": int((rows.repeats * rows.is_reg.astype(bool)).sum()),
        "resolution": list(ds.resolution),
        "enable_bucket": bool(ds.enable_bucket),
        "min_bucket_reso": ds.min_bucket_reso,
        "max_bucket_reso": ds.max_bucket_reso,
        "tag_frequency": own_tags,
        "bucket_info": bucket_info(rows, ds.enable_bucket),
        "resize_interpolation": ds.resize_interpolation,
        "subsets": subsets,
    }


def dataset_metadata(
    datasets: DatasetsConfig, table: pd.DataFrame, from_config: bool, world: int = 1
) -> dict[str, str]:
    """The dataset keys of the reference's metadata for the manifest ``table``'s training split."""
    train = table[table.split == "train"]
    dirs: dict[str, dict] = {}
    tags: dict[str, dict] = {}
    entries = [_dataset(ds, train[train.dataset == di], dirs, tags) for di, ds in enumerate(datasets.datasets)]
    if from_config:
        return {
            "ss_datasets": json.dumps(entries),
            "ss_tag_frequency": json.dumps(tags),
            "ss_dataset_dirs": json.dumps(dirs),
        }
    ds, entry = datasets.datasets[0], entries[0]
    reg = {
        _subset_name(sub): {"n_repeats": sub.num_repeats, "img_count": int((train.subset == si).sum())}
        for si, sub in enumerate(ds.subsets)
        if sub.is_reg
    }
    first = ds.subsets[0]
    flat = {
        "ss_batch_size_per_device": ds.batch_size,
        "ss_total_batch_size": ds.batch_size * world,
        "ss_resolution": tuple(ds.resolution),
        "ss_color_aug": bool(first.color_aug),
        "ss_flip_aug": bool(first.flip_aug),
        "ss_random_crop": bool(first.random_crop),
        "ss_shuffle_caption": bool(first.shuffle_caption),
        "ss_enable_bucket": bool(ds.enable_bucket),
        "ss_bucket_no_upscale": bool(ds.bucket_no_upscale),
        "ss_min_bucket_reso": ds.min_bucket_reso,
        "ss_max_bucket_reso": ds.max_bucket_reso,
        "ss_keep_tokens": first.keep_tokens,
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_reg_dataset_dirs": json.dumps(reg),
        "ss_tag_frequency": json.dumps(tags),
        "ss_bucket_info": json.dumps(entry["bucket_info"]),
    }
    return {k: str(v) for k, v in flat.items()}
