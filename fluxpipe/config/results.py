"""Where the pipeline's results go: every path under results/ is spelled here, read by fluxpipe.workflow (and so
by the Snakefile's rules) and by the commands that find the pipeline's caches (``--cache_dir``)."""

from __future__ import annotations

RESULTS = "results"  # the pipeline's output folder, relative to the workflow's directory

# relative to RESULTS (``fluxpipe train --cache_dir DIR`` finds the caches under DIR)
MANIFEST_IN = "dataset/manifest.parquet"
LATENT_INDEX_IN = "cache/latents/index.parquet"
TEXT_INDEX_IN = "cache/text/index.parquet"

DEMO_DIR = f"{RESULTS}/demo_models"
VALIDATE_REPORT = f"{RESULTS}/validate/models.json"
MANIFEST = f"{RESULTS}/{MANIFEST_IN}"
LATENT_INDEX = f"{RESULTS}/{LATENT_INDEX_IN}"
LATENT_SUMMARY = f"{RESULTS}/cache/latents/summary.json"
TEXT_INDEX = f"{RESULTS}/{TEXT_INDEX_IN}"
TEXT_SUMMARY = f"{RESULTS}/cache/text/summary.json"
SHARD_PATTERN = RESULTS + "/cache/{kind}/shard-{shard}.safetensors"  # a rule's output with wildcard {shard}
TRAIN_DIRS = {m: f"{RESULTS}/train/{m}" for m in ("lora", "full", "controlnet")}
SEGMENT_STATE = RESULTS + "/train/{method}/{name}-seg{end}-state"  # a rule's output, wildcards as written


def shard_path(kind: str, shard: int | str) -> str:
    """One cache shard: ``kind`` latents or text, ``shard`` its number."""
    return SHARD_PATTERN.format(kind=kind, shard=f"{int(shard):03d}")


def evaluate_dir(name: str) -> str:
    """The evaluation outputs of the LoRA named ``name``."""
    return f"{RESULTS}/evaluate/{name}"
