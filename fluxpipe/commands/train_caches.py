"""The manifest and caches a training command reads: the Snakemake pipeline's (``--cache_dir``), or built for a
standalone run in ``<output_dir>/.fluxpipe-cache`` with the same stage code, from the dataset the reference's
flags describe (``--dataset_config``, or folder mode)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fluxpipe.config.reference_flags import FOLDER_FLAGS, dataset_flag_defaults
from fluxpipe.config.results import LATENT_INDEX_IN, MANIFEST_IN, TEXT_INDEX_IN
from fluxpipe.commands.model_types import dit_variant
from fluxpipe.errors import FluxpipeError

if TYPE_CHECKING:
    from fluxpipe.data.augment import ImageAugment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachePaths:
    manifest: Path
    latent_index: Path
    text_index: Path


def pipeline_caches(cache_dir: Path) -> CachePaths:
    """The Snakemake pipeline's caches under ``cache_dir`` (normally results/)."""
    return CachePaths(
        manifest=cache_dir / MANIFEST_IN, latent_index=cache_dir / LATENT_INDEX_IN, text_index=cache_dir / TEXT_INDEX_IN
    )


def with_cli_validation(datasets, ns: argparse.Namespace):  # noqa: ANN001, ANN201 - DatasetsConfig
    """--validation_split / --validation_seed for the datasets whose TOML sets none (the TOML wins)."""
    from dataclasses import replace

    if not ns.validation_split and ns.validation_seed is None:
        return datasets
    out = [
        replace(
            ds,
            validation_split=ds.validation_split or (ns.validation_split or 0.0),
            validation_seed=ds.validation_seed if ds.validation_seed is not None else ns.validation_seed,
        )
        for ds in datasets.datasets
    ]
    return replace(datasets, datasets=tuple(out) if isinstance(datasets.datasets, tuple) else out)


def load_datasets(ns: argparse.Namespace):  # noqa: ANN201 - DatasetsConfig
    """The dataset as the reference builds it from the flags: --dataset_config (TOML or JSON), else folder mode
    (--train_data_dir N_concept subfolders, --reg_data_dir, --in_json); command-line dataset flags as fallbacks."""
    from fluxpipe.config.dataset import folder_datasets, load_dataset_toml, parse_datasets

    defaults = dataset_flag_defaults(ns)
    if ns.dataset_config is not None:
        folders = [f"--{f}" for f in FOLDER_FLAGS if getattr(ns, f) is not None]
        if folders:
            log.warning("%s ignored: --dataset_config is given (as by the reference)", ", ".join(folders))
        return load_dataset_toml(ns.dataset_config, defaults)
    if ns.train_data_dir is None:
        raise FluxpipeError(
            "no dataset: give --dataset_config (a TOML or JSON file) or --train_data_dir (a folder "
            "of N_concept subfolders) with --resolution"
        )
    if "resolution" not in defaults:
        raise FluxpipeError("--train_data_dir needs --resolution (SIZE or W,H, e.g. 512 or 768,512)")
    data = folder_datasets(ns.train_data_dir, ns.reg_data_dir, ns.in_json)
    return parse_datasets(data, f"--train_data_dir {ns.train_data_dir}", defaults)


def check_pipeline_dataset(ns: argparse.Namespace) -> None:
    """The checks build_caches makes, for a run on the pipeline's caches (--cache_dir): what this run's
    cache_latents / cache_text_encoder_outputs cannot honour (the manifest stage refuses it only when every
    training section caches)."""
    from fluxpipe.config.dataset import check_cacheable

    datasets = load_datasets(ns)
    check_cacheable(datasets, cache_latents=bool(ns.cache_latents), cache_text=bool(ns.cache_text_encoder_outputs))
    check_fresh_latents(datasets, ns)


def live_text(ns: argparse.Namespace, clip_tokenizer: Path | None, t5_tokenizer: Path | None):  # noqa: ANN201 - LiveText | None
    """Uncached text (fluxpipe.training.live_text) for a run without --cache_text_encoder_outputs (standalone, or
    the pipeline's with cache_text_encoder_outputs false: its text cache then serves the validation loss only);
    None with it."""
    from fluxpipe.data.captions import CaptionAugment
    from fluxpipe.data.text_encoding import default_t5_max_length
    from fluxpipe.training.live_text import LiveText

    if ns.cache_text_encoder_outputs:
        return None
    datasets = with_cli_validation(load_datasets(ns), ns)
    return LiveText(
        t5xxl=Path(ns.t5xxl),
        clip_l=Path(ns.clip_l) if ns.clip_l else None,
        clip_tokenizer=clip_tokenizer if ns.clip_l else None,
        t5_tokenizer=t5_tokenizer,
        max_length=ns.t5xxl_max_token_length or default_t5_max_length(dit_variant(ns)),
        apply_t5_attn_mask=ns.apply_t5_attn_mask,
        augments=tuple(tuple(CaptionAugment.of(sub) for sub in ds.subsets) for ds in datasets.datasets),
        seed=ns.seed,
    )


def check_fresh_latents(datasets, ns: argparse.Namespace) -> None:  # noqa: ANN001 - DatasetsConfig
    """A crop drawn each step (random_crop, face_crop_aug_range) with Kontext, whose reference latents are cached
    at the centred crop. (A loss mask is cut with its image each step: fluxpipe.training.live_latents.)"""
    if ns.model_type != "kontext":
        return
    for i, ds in enumerate(datasets.datasets):
        for j, sub in enumerate(ds.subsets):
            face = sub.face_crop_aug_range is not None and not ds.enable_bucket
            if sub.num_repeats and (sub.random_crop or face):
                option = "random_crop" if sub.random_crop else "face_crop_aug_range"
                raise FluxpipeError(
                    f"{datasets.source}: datasets[{i}].subsets[{j}]: {option} with Kontext: the reference "
                    f"latents are cached at the centred crop; drop {option} for this subset"
                )


def image_augments(datasets) -> tuple[tuple[ImageAugment, ...], ...]:  # noqa: ANN001 - DatasetsConfig
    """The per-step image keys of every subset; face_crop_aug_range only without buckets (as the reference)."""
    from fluxpipe.data.augment import ImageAugment

    return tuple(
        tuple(
            ImageAugment(
                random_crop=sub.random_crop,
                color_aug=sub.color_aug,
                face_crop=None if ds.enable_bucket else sub.face_crop_aug_range,
            )
            for sub in ds.subsets
        )
        for ds in datasets.datasets
    )


def live_latents(ns: argparse.Namespace):  # noqa: ANN201 - LiveLatents | None
    """Uncached latents (fluxpipe.training.live_latents) for a run without --cache_latents (standalone or the
    pipeline's) whose subsets augment their images each step (random_crop, color_aug, face_crop_aug_range); None otherwise."""
    from fluxpipe.training.live_latents import LiveLatents

    if ns.cache_latents:
        return None
    augments = image_augments(with_cli_validation(load_datasets(ns), ns))
    if not any(a.fresh for row in augments for a in row):
        return None
    return LiveLatents(ae=Path(ns.ae), augments=augments, seed=ns.seed)


def build_caches(
    ns: argparse.Namespace, work: Path, device: str, clip_tokenizer: Path | None, t5_tokenizer: Path | None
) -> CachePaths:
    """Manifest and both caches for a standalone run (one shard each; reruns reuse unchanged entries). Without
    --cache_text_encoder_outputs the text cache still holds the captions (the validation loss reads them) while
    training encodes each step's."""
    from fluxpipe.config.dataset import check_cacheable
    from fluxpipe.stages import manifest

    datasets = with_cli_validation(load_datasets(ns), ns)
    check_cacheable(datasets, cache_latents=bool(ns.cache_latents), cache_text=bool(ns.cache_text_encoder_outputs))
    check_fresh_latents(datasets, ns)
    paths = pipeline_caches(work)
    manifest.run(
        manifest.ManifestConfig(
            datasets=datasets,
            out=paths.manifest,
            latent_shards=1,
            text_shards=1,
            masked_loss=bool(ns.masked_loss),
            caption_seed=ns.seed,  # cached caption slot v is each item's caption of epoch v
        )
    )
    _latent_shard(ns, work, paths, device)
    _text_shard(ns, work, paths, device, clip_tokenizer, t5_tokenizer)
    return paths


def _latent_shard(ns: argparse.Namespace, work: Path, paths: CachePaths, device: str) -> None:
    from fluxpipe.stages import cache_latents

    shard = _fresh_shard(work, "latents")
    cache_latents.run(
        cache_latents.CacheLatentsConfig(
            manifest=paths.manifest,
            ae=Path(ns.ae),
            out=shard,
            shard=0,
            batch_size=ns.vae_batch_size or 1,
            device=device,
            references=ns.model_type == "kontext",
        )
    )
    _index("latents", paths, shard)


def _text_shard(
    ns: argparse.Namespace,
    work: Path,
    paths: CachePaths,
    device: str,
    clip_tokenizer: Path | None,
    t5_tokenizer: Path | None,
) -> None:
    from fluxpipe.data.text_encoding import default_t5_max_length
    from fluxpipe.stages import cache_text

    shard = _fresh_shard(work, "text")
    cache_text.run(
        cache_text.CacheTextConfig(
            manifest=paths.manifest,
            clip_l=Path(ns.clip_l) if ns.clip_l else None,
            t5xxl=Path(ns.t5xxl),
            clip_tokenizer=clip_tokenizer,
            t5_tokenizer=t5_tokenizer,
            out=shard,
            shard=0,
            max_length=ns.t5xxl_max_token_length or default_t5_max_length(dit_variant(ns)),
            apply_t5_attn_mask=ns.apply_t5_attn_mask,
            device=device,
        )
    )
    _index("text", paths, shard)


def _fresh_shard(work: Path, kind: str) -> Path:
    shard = work / f"cache/{kind}/shard-000.safetensors"
    shard.unlink(missing_ok=True)
    return shard


def _index(kind: str, paths: CachePaths, shard: Path) -> None:
    from fluxpipe.stages import cache_index

    index = paths.latent_index if kind == "latents" else paths.text_index
    cache_index.run(
        cache_index.CacheIndexConfig(
            kind=kind, manifest=paths.manifest, shards=(shard,), index=index, summary=index.with_name("summary.json")
        )
    )
