"""Path helpers for the dataset manifest and cache rules (no torch import): the files the manifest reads and
the digests that decide which shard reruns. Re-exported by ``fluxpipe.workflow`` (the rules use ``fw.<name>``)."""

from __future__ import annotations

import functools
import hashlib
import json
import os

from fluxpipe.config.dataset import IMAGE_EXTENSIONS, non_utf8_names, refuse_non_utf8
from fluxpipe.config.pipeline import AUTO_MAX_SHARDS, AUTO_SHARD_IMAGES, PipelineConfig
from fluxpipe.config.reference_flags import DEFAULT_SEED
from fluxpipe.config.results import shard_path

# ---- dataset manifest and caches -------------------------------------------------------------------

CACHE_FORMAT = {"manifest": 1, "latents": 2, "text": 2}  # bump when a stage's output format changes


def shard_paths(kind: str, count: int) -> list[str]:
    return [shard_path(kind, k) for k in range(count)]


def dataset_files(cfg: PipelineConfig) -> list[str]:
    """Every file the manifest reads (images, captions, metadata), found by listing folders only."""
    datasets = cfg.datasets()
    files: set[str] = set()
    bad: list[str] = []  # names Snakemake could not write into its lock files
    for ds in datasets.datasets if datasets else ():
        for sub in ds.subsets:
            if sub.metadata_file:
                files.add(sub.metadata_file)
            for folder in (sub.image_dir, sub.conditioning_data_dir):
                if folder and os.path.isdir(folder):
                    with os.scandir(folder) as it:
                        names = [e.name for e in it if e.is_file()]
                    bad += non_utf8_names(folder, names)
                    stems = {os.path.splitext(n)[0] for n in names if n.lower().endswith(IMAGE_EXTENSIONS)}
                    stems |= {"_".join(t.split("_")[:-4]) for t in stems if t.count("_") >= 4}  # NAME_CX_CY_W_H
                    files.update(
                        os.path.join(folder, n)
                        for n in names
                        if n.lower().endswith(IMAGE_EXTENSIONS)
                        or (n.endswith(sub.caption_extension) and os.path.splitext(n)[0] in stems)
                    )
    refuse_non_utf8(bad)
    return sorted(files)


def shard_count(cfg: PipelineConfig, kind: str) -> int:
    """The number of shard jobs of the latent or text cache: the configured number, or with "auto" one per
    AUTO_SHARD_IMAGES training images found in the dataset's folders (1 to AUTO_MAX_SHARDS): a six-image demo
    runs one latent and one text job, not 2 x 16 jobs' start-up."""
    value = cfg.cache.latent_shards if kind == "latents" else cfg.cache.text_shards
    if value != "auto":
        return int(value)
    datasets = cfg.datasets()
    subsets = [sub for ds in (datasets.datasets if datasets else ()) for sub in ds.subsets]
    conditioning = {os.path.normpath(sub.conditioning_data_dir) for sub in subsets if sub.conditioning_data_dir}
    images = sum(
        1
        for f in dataset_files(cfg)
        if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.normpath(os.path.dirname(f)) not in conditioning
    )
    return max(1, min(AUTO_MAX_SHARDS, -(-images // AUTO_SHARD_IMAGES)))


def masked_loss(cfg: PipelineConfig) -> bool:
    """train.masked_loss: a conditioning image is its target's loss mask (its R channel)."""
    return bool((cfg.train or {}).get("masked_loss"))


def cached_by_every_method(cfg: PipelineConfig, flag: str) -> bool:
    """Whether every configured training section sets ``flag`` (cache_latents / cache_text_encoder_outputs):
    only then (or with no training section) does the manifest refuse what that cache cannot honour; a section
    without it trains uncached (fluxpipe.commands.train_caches) and the training command checks its own flags."""
    sections = [flags for flags in (cfg.train, cfg.train_full, cfg.train_controlnet) if flags]
    return all(bool(flags.get(flag)) for flags in sections)  # no section: strict, as the caching pipeline


def caption_seed(cfg: PipelineConfig) -> int:
    """The seed of the cached caption slots: the LoRA training seed (42 when unset, as the trainer's default)."""
    seed = (cfg.train or {}).get("seed")
    return DEFAULT_SEED if seed is None else int(seed)


def caption_settings(cfg: PipelineConfig) -> list[int] | None:
    """(seed, caption_variants) when a subset augments captions (they decide the cached slots), else None."""
    from fluxpipe.data.captions import CaptionAugment

    datasets = cfg.datasets()
    subsets = [sub for ds in (datasets.datasets if datasets else ()) for sub in ds.subsets]
    if not any(CaptionAugment.of(sub).random for sub in subsets):
        return None
    return [caption_seed(cfg), cfg.cache.caption_variants]


def manifest_params(cfg: PipelineConfig) -> str:
    """The settings the manifest depends on, as one string for Snakemake's params trigger."""
    settings = {
        "datasets": repr(cfg.datasets()),
        "shards": [shard_count(cfg, "latents"), shard_count(cfg, "text")],
        "skip_bad": cfg.cache.skip_bad_images,
        "format": CACHE_FORMAT["manifest"],
        "captions": caption_settings(cfg),
        **({"masked_loss": True} if masked_loss(cfg) else {}),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@functools.lru_cache(maxsize=4)
def _shard_digests(manifest: str, mtime_ns: int, kind: str) -> dict[int, str]:
    import pandas as pd

    cols = {
        "latents": [
            "latent_shard",
            "path",
            "sha256",
            "bucket_w",
            "bucket_h",
            "resized_w",
            "resized_h",
            "crop_left",
            "crop_top",
            "flip_aug",
        ],
        "text": ["text_shard", "caption_sha256"],
    }[kind]
    table = pd.read_parquet(manifest, columns=cols)
    if kind == "latents":  # a subset's resize_interpolation changes its latents (a column only when one is set)
        import pyarrow.parquet as pq

        if "resize_interpolation" in pq.read_schema(manifest).names:
            filters = pd.read_parquet(manifest, columns=["resize_interpolation"]).resize_interpolation
            if (filters != "").any():
                table["resize_interpolation"], cols = filters, [*cols, "resize_interpolation"]
        if "mask_source" in pq.read_schema(manifest).names:  # loss masks (alpha_mask, --masked_loss)
            sources = pd.read_parquet(manifest, columns=["mask_source"]).mask_source
            if (sources != "").any():
                table["mask_source"], cols = sources, [*cols, "mask_source"]
        if "conditioning_sha256" in pq.read_schema(manifest).names:  # Kontext caches the paired references too
            refs = pd.read_parquet(manifest, columns=["conditioning_sha256"]).conditioning_sha256
            if (refs != "").any():
                table["conditioning_sha256"], cols = refs, [*cols, "conditioning_sha256"]
    if kind == "text" and "text_captions" in pq_names(manifest):  # every cached caption slot, in its own shard
        from fluxpipe.data.captions import text_entries

        column = pd.read_parquet(manifest, columns=["text_captions"]).text_captions
        pairs = sorted({(shard, sha) for c in column for sha, shard, _ in text_entries(c)})
        table, cols = pd.DataFrame(pairs, columns=["text_shard", "caption_sha256"]), cols
    shard_col = cols[0]
    digests = {}
    for shard, group in table.groupby(shard_col):
        rows = sorted(set(map(tuple, group[cols[1:]].astype(str).itertuples(index=False, name=None))))
        digests[int(shard)] = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    return digests


def pq_names(path: str) -> list[str]:
    """The column names of a Parquet file (its schema only)."""
    import pyarrow.parquet as pq

    return list(pq.read_schema(path).names)


def shard_digest(manifest: str, kind: str, shard: int | str) -> str:
    """Digest of what one shard must contain, read from the manifest (its params: only changed shards rerun)."""
    return _shard_digests(manifest, os.stat(manifest).st_mtime_ns, kind).get(int(shard), "empty")
