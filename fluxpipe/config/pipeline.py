"""Typed, frozen configuration, validated once at the boundary (no torch import here).

``load_pipeline(mapping)`` turns ``config/config.yaml`` (as Snakemake parsed it) into a
``PipelineConfig``: unknown keys, wrong types and inconsistent settings raise ``ConfigError``
naming the key, so a typo fails when the Snakefile is parsed, before any job starts.
The Snakefile and the command line use this same loader.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import yaml

from fluxpipe.config.model_types import check_chroma
from fluxpipe.config.dataset import DatasetsConfig, load_dataset_toml, parse_datasets
from fluxpipe.config.reference_flags import given_dataset_flags, parse_train_args
from fluxpipe.config.typed import ConfigError, from_dict
from fluxpipe.errors import FluxpipeError

MODEL_SLOTS = ("flux", "ae", "clip_l", "t5xxl")


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelsConfig:
    """Model files in the official single-file layouts. All four empty: the embedded demo models."""

    flux: str | None = None
    """flux1-dev.safetensors or flux1-schnell.safetensors (BFL layout; bf16, fp16, fp32 or float8_e4m3fn)."""
    ae: str | None = None
    """ae.safetensors (BFL layout, not the Diffusers vae/ folder)."""
    clip_l: str | None = None
    """clip_l.safetensors (text_model.* keys)."""
    t5xxl: str | None = None
    """t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors."""
    clip_tokenizer: str | None = None
    """Folder with the CLIP ViT-L/14 tokenizer (vocab.json, merges.txt); empty: the hub id when online."""
    t5_tokenizer: str | None = None
    """Folder with the T5 v1.1 tokenizer (tokenizer.json); empty: the hub id when online."""

    @property
    def demo(self) -> bool:
        return all(getattr(self, s) is None for s in MODEL_SLOTS)

    def check(self, chroma: bool) -> None:
        """All four model files or none (the demo); Chroma (train.model_type: chroma): no CLIP-L, the other three
        or none."""
        if chroma and self.clip_l is not None:
            raise ConfigError(
                f"models.clip_l: {self.clip_l}: Chroma (train.model_type: chroma) uses no CLIP-L text encoder; "
                "leave models.clip_l empty"
            )
        slots = [s for s in MODEL_SLOTS if not (chroma and s == "clip_l")]
        given = [s for s in slots if getattr(self, s) is not None]
        if given and len(given) != len(slots):
            missing = [s for s in slots if s not in given]
            what = "the Chroma DiT (models.flux), ae and t5xxl" if chroma else "all four model files"
            named = ", ".join("models." + m for m in missing)
            raise ConfigError(f"models: set {what} or none (none = demo models); missing: {named}")


DTYPES = ("float32", "bfloat16", "float16")
AUTO_SHARD_IMAGES = 500  # cache.*_shards "auto": one shard job per this many images ...
AUTO_MAX_SHARDS = 16  # ... and at most this many


@dataclass(frozen=True, kw_only=True, slots=True)
class CacheConfig:
    """How the latent and text-encoder caches are built (changing these re-encodes what they affect)."""

    latent_shards: int | str = "auto"
    """Number of latent shard jobs (items assigned by a stable hash of their path); changing it re-shards (the
    entries are reused, not encoded again). "auto": one per AUTO_SHARD_IMAGES images of the dataset, 1 to
    AUTO_MAX_SHARDS."""
    text_shards: int | str = "auto"
    """Number of text shard jobs (captions assigned by a stable hash of their text); "auto" as latent_shards."""
    vae_batch_size: int = 4
    """Images per AE encode batch (one bucket per batch)."""
    text_encoder_batch_size: int = 8
    """Captions per text-encoder batch."""
    latent_dtype: str = "float32"
    """Storage dtype of the AE posterior mean and log-variance."""
    text_dtype: str = "bfloat16"
    """Storage dtype of CLIP pooled and T5 outputs."""
    t5xxl_max_token_length: int | None = None
    """T5 tokens per caption; empty: 512 for dev, 256 for schnell."""
    apply_t5_attn_mask: bool = False
    """Pass the padding mask to T5 (and later to the DiT)."""
    skip_bad_images: bool = False
    """Leave unreadable images out (listed in the log) instead of failing."""
    device: str = "auto"
    """Where the encoders run: auto (cuda if available), cpu, cuda, cuda:N."""
    decode_workers: int = 2
    """Threads decoding and resizing images while the AE encodes."""
    compile_text_encoder: str = "auto"
    """torch.compile T5-XXL: auto (on CUDA, for 5000+ captions to encode), true, false."""
    caption_variants: int = 4
    """Cached captions per image of a subset that augments captions (shuffle_caption, caption dropout, tag
    dropout, wildcards): epoch e trains on the caption drawn for epoch e mod caption_variants."""

    def __post_init__(self) -> None:
        for name in ("latent_shards", "text_shards"):
            value = getattr(self, name)
            if value != "auto" and (isinstance(value, str) or value < 1):
                raise ConfigError(f"cache.{name}: {value!r} is neither auto nor a whole number of at least 1")
        for name in ("vae_batch_size", "text_encoder_batch_size", "decode_workers", "caption_variants"):
            if getattr(self, name) < 1:
                raise ConfigError(f"cache.{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("latent_dtype", "text_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"cache.{name}: {getattr(self, name)!r} is not one of {', '.join(DTYPES)}")
        if self.t5xxl_max_token_length is not None and not 1 <= self.t5xxl_max_token_length <= 512:
            raise ConfigError(f"cache.t5xxl_max_token_length: {self.t5xxl_max_token_length} is outside 1..512")
        if self.compile_text_encoder not in ("auto", "true", "false"):
            raise ConfigError(f"cache.compile_text_encoder: {self.compile_text_encoder!r} is not auto, true or false")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"cache.device: {self.device!r} is not auto, cpu, cuda or cuda:N")


@dataclass(frozen=True, kw_only=True, slots=True)
class EvaluateConfig:
    """Rule evaluate_samples: every saved LoRA of the run (and the base model) on fixed prompts x seeds."""

    prompts: tuple[str, ...] = ("a photo of an astronaut", "a cup of coffee on a wooden table")
    """Prompts (plain text; ignored when prompts_file is set)."""
    prompts_file: str | None = None
    """A prompt file in the reference's .txt / .toml / .json format (per-prompt sizes, steps, seeds, ...)."""
    seeds: tuple[int, ...] = (0, 1)
    """Seeds for prompts without their own (official noise: the same images in other FLUX.1 tools)."""
    width: int = 1024
    height: int = 1024
    steps: int | None = None
    """Euler steps (empty: 50 for dev, 4 for schnell)."""
    guidance: float = 3.5
    lora_multiplier: float = 1.0
    controlnet: str | None = None
    """A ControlNet-Flux file for prompts with a control image (--cn in the prompt file)."""
    reference_image: str | None = None
    """FLUX.1 Kontext: the reference image of every prompt (a Kontext base model and LoRA)."""
    reference_size: str = "kontext"
    """Kontext reference resize: kontext (the official: nearest Kontext resolution) or target (the sample's size)."""
    blocks_to_swap: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ConfigError("evaluate.seeds: give at least one seed")
        if not self.prompts and not self.prompts_file:
            raise ConfigError("evaluate: set prompts (a list) or prompts_file")
        if self.reference_size not in ("kontext", "target"):
            raise ConfigError(f"evaluate.reference_size: {self.reference_size!r} is not kontext or target")


@dataclass(frozen=True, kw_only=True, slots=True)
class PipelineConfig:
    """Everything in config/config.yaml."""

    models: ModelsConfig = dataclasses.field(default_factory=ModelsConfig)
    """Model and tokenizer files."""
    hash_cache: str | None = None
    """JSON file caching sha256 of model files by size+mtime (empty: ~/.cache/fluxpipe/sha256.json)."""
    dataset_config: str | None = None
    """A dataset TOML in the reference trainer's format ([general], [[datasets]], [[datasets.subsets]])."""
    dataset: dict | None = None
    """The same structure inline (general: {...}, datasets: [{..., subsets: [...]}]); exclusive with dataset_config."""
    cache: CacheConfig = dataclasses.field(default_factory=CacheConfig)
    """Latent and text-encoder cache settings."""
    train: dict | None = None
    """LoRA training settings: the reference trainer's flags by name (network_dim: 16, ...)."""
    train_processes: int = 1
    """Data-parallel processes of the training rules (torchrun, one per GPU; each takes the dataset's batch_size):
    DDP for LoRA and ControlNet, FSDP2 for the full fine-tune."""
    train_segment_steps: int = 0
    """0: each training run is one job. K: chained jobs of K optimizer steps each, every one resuming the state
    of the one before (for queues with wall-time limits); the result equals one job's."""
    train_full: dict | None = None
    """Full fine-tune settings (rule train_full): flux_train.py's flags by name."""
    train_controlnet: dict | None = None
    """ControlNet settings (rule train_controlnet): flux_train_control_net.py's flags by name."""
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)
    """The evaluate stage: sample grids across the saved LoRAs, loss curves, metrics."""

    def __post_init__(self) -> None:
        if self.dataset_config is not None and self.dataset is not None:
            raise ConfigError("set either dataset_config (a TOML file) or dataset (inline), not both")
        if self.train_processes < 1:
            raise ConfigError(f"train_processes: {self.train_processes} is not a positive number of processes")
        if self.train_segment_steps < 0:
            raise ConfigError(f"train_segment_steps: {self.train_segment_steps} is negative (0: no segments)")
        self.models.check(self.chroma)
        if self.chroma:
            check_chroma_pipeline(self)

    @property
    def chroma(self) -> bool:
        """The pipeline's model is Chroma (train.model_type: chroma): models.flux names a Chroma DiT."""
        return (self.train or {}).get("model_type") == "chroma"

    def datasets(self) -> DatasetsConfig | None:
        """The validated dataset structure (None when no dataset is configured)."""
        if self.dataset_config is not None:
            return load_dataset_toml(self.dataset_config)
        if self.dataset is not None:
            return parse_datasets(self.dataset, source="config.yaml:dataset")
        return None


def check_chroma_pipeline(cfg: PipelineConfig) -> None:
    """What a Chroma pipeline needs beyond the training flags (those are checked as `fluxpipe train lora
    --model_type chroma` checks them): LoRA training only, the T5 mask in the text cache."""
    others = [s for s in ("train_full", "train_controlnet") if getattr(cfg, s) is not None]
    if others:
        raise ConfigError(
            f"{', '.join(others)}: train.model_type chroma: only LoRA training supports Chroma; leave "
            f"{' and '.join(others)} empty (`{others[0]}:` with no value)"
        )
    if not cfg.cache.apply_t5_attn_mask:
        raise ConfigError(
            "cache.apply_t5_attn_mask: false, but Chroma (train.model_type: chroma) needs the T5 attention mask "
            "in the text cache: set cache.apply_t5_attn_mask: true"
        )


def load_pipeline(data: dict[str, Any] | None) -> PipelineConfig:
    """PipelineConfig from the parsed config.yaml mapping (empty strings count as unset); the dataset
    structure is validated too, so a typo anywhere fails here."""
    cfg = from_dict(PipelineConfig, _blank_to_none(data or {}))
    cfg.datasets()
    for section, method in (("train", "lora"), ("train_full", "full"), ("train_controlnet", "controlnet")):
        flags = getattr(cfg, section)
        if flags is not None:
            owned = {k: "x" for k in PIPELINE_OWNED_FLAGS if not (cfg.chroma and k == "clip_l")}
            try:  # fails on any bad flag, naming the section
                ns = parse_train_args(train_argv(flags, owned), method)
                check_chroma(ns, method)  # (as the standalone command: LoRA only, the T5 mask, guidance 0)
            except FluxpipeError as e:
                raise ConfigError(f"{section}: {e}") from e
            if given_dataset_flags(ns):
                raise ConfigError(
                    f"{section}: {', '.join(k.lstrip('-') for k in given_dataset_flags(ns))} are "
                    "dataset settings: set them in the dataset config (batch_size for train_batch_size, "
                    "num_repeats for dataset_repeats)"
                )
    return cfg


# training flags that come from the pipeline's own settings (models, dataset, where results go)
PIPELINE_OWNED_FLAGS = ("pretrained_model_name_or_path", "clip_l", "t5xxl", "ae", "dataset_config", "output_dir")


def train_argv(train: dict[str, Any], owned: Mapping[str, str | None]) -> list[str]:
    """config.yaml's ``train:`` mapping as the reference's command line (true -> --flag, lists -> nargs)."""
    clash = sorted(set(train) & set(PIPELINE_OWNED_FLAGS))
    if clash:
        raise ConfigError(
            f"{', '.join(clash)} come from models / dataset_config in config.yaml; "
            "remove them from the training section"
        )
    argv: list[str] = []
    for key, value in {**owned, **train}.items():
        if value is None or value is False:
            continue
        argv.append(f"--{key}")
        if isinstance(value, list | tuple):
            argv += [str(v) for v in value]
        elif value is not True:
            argv.append(str(value))
    return argv


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: config file not found") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    return data or {}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Mappings merged key by key (as Snakemake merges --configfile files); other values replaced."""
    out = dict(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_pipeline_file(*paths: str | Path) -> PipelineConfig:
    """PipelineConfig from one or more YAML files, later files overriding earlier ones."""
    data: dict[str, Any] = {}
    for path in paths:
        data = deep_merge(data, read_yaml(path))
    return load_pipeline(data)


def _blank_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _blank_to_none(v) for k, v in value.items()}
    return None if value == "" else value
