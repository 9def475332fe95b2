"""`fluxpipe manifest | cache-latents | cache-text | cache-index`: the dataset manifest and the caches."""

from __future__ import annotations

import argparse
from pathlib import Path

from fluxpipe.cli.common import add_config, pipeline
from fluxpipe.errors import FluxpipeError
from fluxpipe.parallel.devices import resolve_device


def _manifest(args: argparse.Namespace) -> None:
    from fluxpipe import workflow
    from fluxpipe.stages import manifest

    cfg = pipeline(args)
    datasets = cfg.datasets()
    if datasets is None:
        raise FluxpipeError("no dataset configured: set dataset_config (a TOML file) or dataset in config.yaml")
    from fluxpipe.config.dataset import check_cacheable

    check_cacheable(
        datasets,
        cache_latents=workflow.cached_by_every_method(cfg, "cache_latents"),
        cache_text=workflow.cached_by_every_method(cfg, "cache_text_encoder_outputs"),
    )
    manifest.run(
        manifest.ManifestConfig(
            datasets=datasets,
            out=args.out,
            latent_shards=args.latent_shards or workflow.shard_count(cfg, "latents"),
            text_shards=args.text_shards or workflow.shard_count(cfg, "text"),
            skip_bad_images=cfg.cache.skip_bad_images,
            hash_cache=cfg.hash_cache,
            workers=cfg.cache.decode_workers,
            masked_loss=workflow.masked_loss(cfg),
            caption_seed=workflow.caption_seed(cfg),
            caption_variants=cfg.cache.caption_variants,
        )
    )


def _cache_latents(args: argparse.Namespace) -> None:
    from fluxpipe import workflow
    from fluxpipe.stages import cache_latents

    cfg = pipeline(args)
    c = cfg.cache
    cache_latents.run(
        cache_latents.CacheLatentsConfig(
            manifest=args.manifest,
            ae=Path(workflow.model_files(cfg)["ae"]),
            out=args.out,
            shard=args.shard,
            batch_size=c.vae_batch_size,
            dtype=c.latent_dtype,
            device=resolve_device(c.device),
            decode_workers=c.decode_workers,
            hash_cache=cfg.hash_cache,
            references=workflow.kontext(cfg),
        )
    )


def _cache_text(args: argparse.Namespace) -> None:
    from fluxpipe import workflow
    from fluxpipe.data.text_encoding import default_t5_max_length
    from fluxpipe.io.checkpoints import inspect_checkpoint
    from fluxpipe.stages import cache_text

    cfg = pipeline(args)
    c = cfg.cache
    files, toks = workflow.model_files(cfg), workflow.tokenizer_dirs(cfg)
    variant = inspect_checkpoint(files["flux"], workflow.dit_slot(cfg)).describe()["variant"]
    cache_text.run(
        cache_text.CacheTextConfig(
            manifest=args.manifest,
            clip_l=Path(files["clip_l"]) if "clip_l" in files else None,  # (none for Chroma)
            t5xxl=Path(files["t5xxl"]),
            clip_tokenizer=Path(toks["clip_tokenizer"]) if toks["clip_tokenizer"] else None,
            t5_tokenizer=Path(toks["t5_tokenizer"]) if toks["t5_tokenizer"] else None,
            out=args.out,
            shard=args.shard,
            max_length=c.t5xxl_max_token_length or default_t5_max_length(str(variant)),
            apply_t5_attn_mask=c.apply_t5_attn_mask,
            batch_size=c.text_encoder_batch_size,
            dtype=c.text_dtype,
            device=resolve_device(c.device),
            hash_cache=cfg.hash_cache,
            compile=c.compile_text_encoder,
        )
    )


def _cache_index(args: argparse.Namespace) -> None:
    from fluxpipe.stages import cache_index

    cache_index.run(
        cache_index.CacheIndexConfig(
            kind=args.kind, manifest=args.manifest, shards=tuple(args.shards), index=args.index, summary=args.summary
        )
    )


def add_cache_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("manifest", help="scan the dataset into a Parquet manifest (hashes, captions, buckets)")
    add_config(p)
    p.add_argument("--out", type=Path, required=True, help="manifest .parquet")
    for kind in ("latent", "text"):
        p.add_argument(
            f"--{kind}-shards", type=int, help=f"{kind} shard jobs (default: cache.{kind}_shards, auto: per 500 images)"
        )
    p.set_defaults(func=_manifest)
    for name, func, what in (
        ("cache-latents", _cache_latents, "AE latents"),
        ("cache-text", _cache_text, "CLIP-L / T5-XXL outputs"),
    ):
        p = sub.add_parser(name, help=f"build one shard of the {what} cache")
        add_config(p)
        p.add_argument("--manifest", type=Path, required=True)
        p.add_argument("--shard", type=int, required=True)
        p.add_argument("--out", type=Path, required=True, help="shard .safetensors")
        p.set_defaults(func=func)
    p = sub.add_parser("cache-index", help="gather cache shards into an index and a summary JSON")
    p.add_argument("--kind", choices=("latents", "text"), required=True)
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--index", type=Path, required=True, help="index .parquet")
    p.add_argument("--summary", type=Path, required=True, help="summary .json")
    p.add_argument("shards", type=Path, nargs="+")
    p.set_defaults(func=_cache_index)
