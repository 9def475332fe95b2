"""Pure path helpers for the Snakefile (no torch import): where each stage reads and writes.

The rules stay thin by asking these functions for their inputs; the functions are tested on their own. The
manifest and cache digests live in ``workflow.cache`` (re-exported here: the rules read ``fw.<name>``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from pathlib import Path

from fluxpipe.config.pipeline import MODEL_SLOTS, PipelineConfig, load_pipeline, train_argv
from fluxpipe.config.typed import ConfigError
from fluxpipe.errors import FluxpipeError
from fluxpipe.config.results import (  # noqa: F401 - the rules read these through this module
    DEMO_DIR,
    LATENT_INDEX,
    LATENT_SUMMARY,
    MANIFEST,
    RESULTS,
    SEGMENT_STATE,
    SHARD_PATTERN,
    TEXT_INDEX,
    TEXT_SUMMARY,
    TRAIN_DIRS,
    VALIDATE_REPORT,
    shard_path,
)
from fluxpipe.config.results import evaluate_dir as _evaluate_dir
from fluxpipe.workflow.cache import (  # noqa: F401 - the rules read these through this module
    CACHE_FORMAT,
    cached_by_every_method,
    caption_seed,
    caption_settings,
    dataset_files,
    manifest_params,
    masked_loss,
    pq_names,
    shard_digest,
    shard_count,
    shard_paths,
)

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
DEMO_VERSION = 2  # bump when the demo models' content changes
# rule demo_chroma: the DiT of the demo with train.model_type chroma
DEMO_CHROMA = f"{DEMO_DIR}/chroma-tiny.safetensors"


def model_slots(cfg: PipelineConfig) -> tuple[str, ...]:
    """The model files the pipeline uses: all four, or without CLIP-L for Chroma (train.model_type: chroma)."""
    return tuple(s for s in MODEL_SLOTS if not (cfg.chroma and s == "clip_l"))


def model_files(cfg: PipelineConfig) -> dict[str, str]:
    """slot -> model file: the configured paths, or the demo models when none is configured (the tiny Chroma DiT
    under ``flux`` for Chroma); Chroma has no ``clip_l``."""
    if cfg.models.demo:
        return {s: DEMO_CHROMA if cfg.chroma and s == "flux" else DEMO_FILES[s] for s in model_slots(cfg)}
    return {s: getattr(cfg.models, s) for s in model_slots(cfg)}


def tokenizer_dirs(cfg: PipelineConfig) -> dict[str, str | None]:
    """Tokenizer folders: the demo's own with the demo models, else the configured ones (None: hub id); no CLIP
    tokenizer for Chroma."""
    if cfg.models.demo:
        dirs: dict[str, str | None] = {k: DEMO_FILES[k] for k in ("clip_tokenizer", "t5_tokenizer")}
    else:
        dirs = {"clip_tokenizer": cfg.models.clip_tokenizer, "t5_tokenizer": cfg.models.t5_tokenizer}
    return {**dirs, "clip_tokenizer": None} if cfg.chroma else dirs


def dit_slot(cfg: PipelineConfig) -> str:
    """The loader slot of models.flux: ``chroma`` for Chroma (fluxpipe.io.checkpoints.dit_slot), else ``flux``."""
    return "chroma" if cfg.chroma else "flux"


def validate_inputs(cfg: PipelineConfig) -> dict[str, str]:
    """Files the validate rule depends on (model files plus tokenizer files when they are local)."""
    inputs = model_files(cfg)
    if cfg.models.demo:
        if not cfg.chroma:
            inputs["clip_vocab"] = f"{DEMO_FILES['clip_tokenizer']}/vocab.json"
        inputs["t5_vocab"] = f"{DEMO_FILES['t5_tokenizer']}/tokenizer.json"
    return inputs


def validate_files_argv(cfg: PipelineConfig) -> list[str]:
    """`fluxpipe validate`'s model files (--flux FILE --ae FILE ...; no --clip-l for Chroma)."""
    return [word for slot, path in model_files(cfg).items() for word in (f"--{slot.replace('_', '-')}", path)]


def validate_args(cfg: PipelineConfig) -> list[str]:
    """Extra command-line words for `fluxpipe validate` (the model type, tokenizers, hash cache); quote with
    {params.x:q}."""
    args: list[str] = ["--model-type", "chroma"] if cfg.chroma else []
    for key, folder in tokenizer_dirs(cfg).items():
        if folder:
            args += [f"--{key.replace('_', '-')}", folder]
    if cfg.hash_cache:
        args += ["--hash-cache", cfg.hash_cache]
    return args


def validated_digests(report: str) -> dict[str, str]:
    """sha256 of each validated model file and tokenizer folder ("hub" for a hub tokenizer), from the
    validate report: what the settings digests of the later rules name, so a changed file reruns exactly
    the jobs that use it, and a rewritten report with the same files reruns none."""
    data = json.loads(open(report, encoding="utf-8").read())
    digests = {slot: entry["sha256"] for slot, entry in data["models"].items()}
    for key in ("clip_tokenizer", "t5_tokenizer"):
        digests[key] = (data.get("tokenizers") or {}).get(key, {}).get("sha256", "hub")
    return digests


def kontext(cfg: PipelineConfig) -> bool:
    """Kontext LoRA training (train.model_type: kontext): the latent cache also holds the reference images."""
    return (cfg.train or {}).get("model_type") == "kontext"


def settings_digest(settings: dict) -> str:
    """One string for Snakemake's params trigger: a job reruns when, and only when, it changes."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def latent_params(cfg: PipelineConfig, report: str) -> str:
    c, files = cfg.cache, validated_digests(report)
    refs = {"references": True} if kontext(cfg) else {}  # (absent otherwise: existing digests unchanged)
    return settings_digest(
        {"ae": files["ae"], "dtype": c.latent_dtype, "device": c.device, "format": CACHE_FORMAT["latents"], **refs}
    )


def text_params(cfg: PipelineConfig, report: str) -> str:
    c, files = cfg.cache, validated_digests(report)
    # (Chroma: the report names its DiT "chroma" and has no clip_l, so no FLUX cache digest matches a Chroma one)
    used = ("clip_l", "t5xxl", "flux", "chroma", "clip_tokenizer", "t5_tokenizer")
    return settings_digest(
        {
            **{k: files[k] for k in used if k in files},
            "len": c.t5xxl_max_token_length,
            "mask": c.apply_t5_attn_mask,
            "dtype": c.text_dtype,
            "device": c.device,
            "format": CACHE_FORMAT["text"],
        }
    )


def train_params(cfg: PipelineConfig, report: str) -> str:
    """What a training job uses besides its flags and caches: every model file and tokenizer, the dataset."""
    return settings_digest(
        {"models": validated_digests(report), "datasets": repr(cfg.datasets()), "processes": cfg.train_processes}
    )


def evaluate_params(cfg: PipelineConfig, report: str) -> str:
    """The evaluate stage's settings (evaluate:, the T5 length and mask) and the model files it samples with."""
    return settings_digest(
        {
            "models": validated_digests(report),
            "evaluate": dataclasses.asdict(cfg.evaluate),
            "len": cfg.cache.t5xxl_max_token_length,
            "mask": cfg.cache.apply_t5_attn_mask,
            "name": (cfg.train or {}).get("output_name"),
        }
    )


def evaluate_inputs(cfg: PipelineConfig) -> list[str]:
    """Files of evaluate: besides the LoRAs (prompt file, ControlNet): edited, they rerun the evaluation."""
    return [f for f in (cfg.evaluate.prompts_file, cfg.evaluate.controlnet) if f]


def config_json(config: dict) -> str:
    """The merged settings (config.yaml, --configfile files and --config values as Snakemake merged them) as one
    JSON object, for `fluxpipe <stage> --config-json`. Not a file (a dry run writes nothing); not tracked either:
    each rule's params name the settings it depends on."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)


def failure_lines(logs: list[str], tail: int = 5) -> tuple[list[str], bool]:
    """What the terminal shows for failed jobs: each log's `fluxpipe: error:` lines (bad input), else its last
    lines (a bug's traceback). Also whether every failure was a fluxpipe error (exit status 2, as `fluxpipe`)."""
    out, all_errors = [], bool(logs)
    for log in logs:
        try:
            lines = open(log, encoding="utf-8", errors="replace").read().splitlines()
        except OSError:
            lines = []
        errors = [line for line in lines if line.startswith("fluxpipe: error:")]
        all_errors &= bool(errors)
        out += [f"{log}:"] + ["  " + line for line in (errors or lines[-tail:] or ["(empty)"])]
    return out, all_errors


# ---- training ----------------------------------------------------------------------------------------

TRAIN_DIR = TRAIN_DIRS["lora"]


def lora_output(cfg: PipelineConfig) -> str:
    name = (cfg.train or {}).get("output_name") or "last"
    return f"{TRAIN_DIR}/{name}.safetensors"


METHOD_DIRS = {m: TRAIN_DIRS[m] for m in ("full", "controlnet")}
METHOD_SECTIONS = {"full": "train_full", "controlnet": "train_controlnet"}


def method_output(cfg: PipelineConfig, method: str) -> str:
    """The final file of rule train_full / train_controlnet."""
    flags = getattr(cfg, METHOD_SECTIONS[method]) or {}
    return f"{METHOD_DIRS[method]}/{flags.get('output_name') or 'last'}.safetensors"


def owned_flags(cfg: PipelineConfig, output_dir: str) -> dict[str, str | None]:
    """The training flags the pipeline sets itself: its model files, the dataset config and the output folder."""
    files = model_files(cfg)
    return {
        "pretrained_model_name_or_path": files["flux"],
        "clip_l": files.get("clip_l"),  # (none for Chroma)
        "t5xxl": files["t5xxl"],
        "ae": files["ae"],
        "dataset_config": cfg.dataset_config or "",
        "output_dir": output_dir,
    }


def method_argv(cfg: PipelineConfig, method: str) -> list[str]:
    """The reference's flags for `fluxpipe train full|controlnet`: the pipeline's files plus its section."""
    return train_argv(getattr(cfg, METHOD_SECTIONS[method]) or {}, owned_flags(cfg, METHOD_DIRS[method]))


def method_dir(method: str) -> str:
    return TRAIN_DIR if method == "lora" else METHOD_DIRS[method]


def method_flags(cfg: PipelineConfig, method: str) -> dict:
    """config.yaml's section of a training method (train:, train_full:, train_controlnet:)."""
    return (cfg.train if method == "lora" else getattr(cfg, METHOD_SECTIONS[method])) or {}


def planned_steps(cfg: PipelineConfig, method: str, manifest: str) -> int:
    """The optimizer steps a run will make, as the trainer plans them (max_train_epochs over max_train_steps)."""
    from fluxpipe.data.batches import batches_per_epoch  # loads torch: only for the rules that plan steps

    flags = method_flags(cfg, method)
    if not flags.get("max_train_epochs"):
        return int(flags.get("max_train_steps") or 1600)
    datasets = cfg.datasets()
    if datasets is None:
        raise ConfigError("no dataset configured: set dataset_config (a TOML file) or dataset in config.yaml")
    sizes = {i: ds.batch_size * cfg.train_processes for i, ds in enumerate(datasets.datasets)}
    per_epoch = math.ceil(batches_per_epoch(Path(manifest), sizes) / int(flags.get("gradient_accumulation_steps") or 1))
    return int(flags["max_train_epochs"]) * per_epoch


def segment_state(cfg: PipelineConfig, method: str, end: int) -> str:
    """The state folder the segment that stops at step ``end`` leaves (`fluxpipe train --stop_at_step`)."""
    name = method_flags(cfg, method).get("output_name") or "last"
    return f"{method_dir(method)}/{name}-seg{end:08d}-state"


def segment_ends(cfg: PipelineConfig, method: str, manifest: str) -> list[int]:
    """Where the chained jobs of a run stop: K, 2K, ... below its total steps (none: the run is one job)."""
    k = cfg.train_segment_steps
    return list(range(k, planned_steps(cfg, method, manifest), k)) if k else []


def previous_segment(cfg: PipelineConfig, method: str, end: int) -> list[str]:
    """The state a segment resumes from (none for the first)."""
    k = cfg.train_segment_steps
    if not k or end % k:
        raise ValueError(f"{segment_state(cfg, method, end)}: not a segment of train_segment_steps {k}")
    return [segment_state(cfg, method, end - k)] if end > k else []


def cache_root(latent_summary: str) -> str:
    """`--cache_dir` of the training rules: the folder holding cache/latents/summary.json (normally results/)."""
    return str(Path(latent_summary).parents[2])


def train_launcher(cfg: PipelineConfig) -> str:
    """The command that starts `fluxpipe train`: itself, or torchrun with one process per GPU."""
    if cfg.train_processes == 1:
        return "fluxpipe"
    return f"torchrun --standalone --nproc-per-node {cfg.train_processes} -m fluxpipe.cli"


def tokenizer_argv(cfg: PipelineConfig) -> list[str]:
    """fluxpipe's own --clip_tokenizer / --t5_tokenizer flags for a training job: its samples, a CLIP-L LoRA and
    uncached text tokenize captions (no flag: the hub's, from its local cache)."""
    argv: list[str] = []
    for key, folder in tokenizer_dirs(cfg).items():
        if folder:
            argv += [f"--{key}", folder]
    return argv


def training_argv(cfg: PipelineConfig, method: str) -> list[str]:
    """`fluxpipe train <method>`'s flags from config.yaml: the pipeline's files plus the method's section
    (train:, train_full:, train_controlnet:) and the tokenizer folders."""
    if method == "lora":
        argv = train_argv(cfg.train or {}, owned_flags(cfg, TRAIN_DIR))
    else:
        argv = method_argv(cfg, method)
    return argv + tokenizer_argv(cfg)


# ---- evaluation --------------------------------------------------------------------------------------


def evaluate_dir(cfg: PipelineConfig) -> str:
    name = (cfg.train or {}).get("output_name") or "last"
    return _evaluate_dir(name)


# ---- errors --------------------------------------------------------------------------------------------


def load_or_exit(config: dict) -> PipelineConfig:
    """The typed config, or the `fluxpipe: error:` line and exit status 2 (as every `fluxpipe` command)."""
    try:
        return load_pipeline(config)
    except FluxpipeError as e:
        print(f"fluxpipe: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def report_failures(logs: list[str]) -> None:
    """Snakemake's onerror: show the failed jobs' errors in the terminal (their logs stay in logs/); exit
    status 2 when each failure was bad input, as the `fluxpipe` command itself (else Snakemake's 1)."""
    lines, bad_input = failure_lines(logs)
    if lines:
        print("\n".join(["fluxpipe: failed job(s):", *lines]), file=sys.stderr)
    if bad_input:
        raise SystemExit(2)
