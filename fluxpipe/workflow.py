"""Pure path helpers for the Snakefile (no torch import): where each stage reads and writes.

The rules stay thin by asking these functions for their inputs; the functions are tested on their own.
"""

from __future__ import annotations

from fluxpipe.config import MODEL_SLOTS, PipelineConfig

DEMO_DIR = "results/demo_models"
DEMO_FILES = {
    "flux": f"{DEMO_DIR}/flux1-dev.safetensors",
    "ae": f"{DEMO_DIR}/ae.safetensors",
    "clip_l": f"{DEMO_DIR}/clip_l.safetensors",
    "t5xxl": f"{DEMO_DIR}/t5xxl_fp16.safetensors",
    "clip_tokenizer": f"{DEMO_DIR}/tokenizers/clip-vit-large-patch14",
    "t5_tokenizer": f"{DEMO_DIR}/tokenizers/t5-v1_1-xxl",
}
DEMO_OUTPUTS = [DEMO_FILES[s] for s in MODEL_SLOTS] + [
    f"{DEMO_DIR}/flux1-schnell.safetensors",
    f"{DEMO_FILES['clip_tokenizer']}/vocab.json",
    f"{DEMO_FILES['t5_tokenizer']}/tokenizer.json",
]
VALIDATE_REPORT = "results/validate/models.json"


def model_files(cfg: PipelineConfig) -> dict[str, str]:
    """slot -> model file: the configured paths, or the demo models when none is configured."""
    if cfg.models.demo:
        return {s: DEMO_FILES[s] for s in MODEL_SLOTS}
    return {s: getattr(cfg.models, s) for s in MODEL_SLOTS}


def tokenizer_dirs(cfg: PipelineConfig) -> dict[str, str | None]:
    """Tokenizer folders: the demo's own with the demo models, else the configured ones (None: hub id)."""
    if cfg.models.demo:
        return {k: DEMO_FILES[k] for k in ("clip_tokenizer", "t5_tokenizer")}
    return {"clip_tokenizer": cfg.models.clip_tokenizer, "t5_tokenizer": cfg.models.t5_tokenizer}


def validate_inputs(cfg: PipelineConfig) -> dict[str, str]:
    """Files the validate rule depends on (model files plus tokenizer files when they are local)."""
    inputs = model_files(cfg)
    if cfg.models.demo:
        inputs["clip_vocab"] = f"{DEMO_FILES['clip_tokenizer']}/vocab.json"
        inputs["t5_vocab"] = f"{DEMO_FILES['t5_tokenizer']}/tokenizer.json"
    return inputs


def validate_args(cfg: PipelineConfig) -> list[str]:
    """Extra command-line words for `fluxpipe validate` (tokenizers, hash cache); quote with {params.x:q}."""
    args: list[str] = []
    for key, folder in tokenizer_dirs(cfg).items():
        if folder:
            args += [f"--{key.replace('_', '-')}", folder]
    if cfg.hash_cache:
        args += ["--hash-cache", cfg.hash_cache]
    return args
