"""The reference trainer's ``--dataset_config`` ([general], [[datasets]], [[datasets.subsets]]) as frozen dataclasses.

``load_dataset_toml(path)`` reads the TOML (or JSON) verbatim; ``folder_datasets`` builds the same structure from
the reference's folder mode (``N_concept`` subfolders); ``parse_datasets(mapping, source)`` takes the same
structure from config.yaml (a null value there means "unset"). Keys merge subset > dataset > general > command
line > defaults. Unknown or misplaced keys, wrong types and impossible values raise ``ConfigError`` naming the
file and the key's location (``datasets[0].subsets[1].num_repeats``). Paths are not checked here: the manifest stage does that.
``check_cacheable`` refuses what the caches cannot honour. Unlike the reference, fluxpipe applies ``caption_prefix``,
``caption_suffix`` and caption augmentation (shuffle, dropout, tag dropout, wildcards, every-n-epochs dropout) to
cached captions: each item's augmented captions are cached as a few content-addressed variants
(``fluxpipe.data.captions``); the alpha-channel loss mask is cached with the latents.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import os
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxpipe.config.typed import ConfigError, convert

INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


@dataclass(frozen=True, kw_only=True, slots=True)
class SubsetConfig:
    """One [[datasets.subsets]] table, merged with its dataset's and [general]'s subset-level keys."""

    image_dir: str | None = None
    """Image folder (subset-only; required for DreamBooth and ControlNet subsets)."""
    num_repeats: int = 1
    """Times each image is seen per epoch; 0 ignores the subset."""
    caption_extension: str = ".caption"
    """Caption file extension next to each image (a leading dot is added if missing)."""
    class_tokens: str | None = None
    """Caption used for images without a caption file (DreamBooth)."""
    is_reg: bool = False
    """Regularization images (subset-only; weighted by prior_loss_weight)."""
    cache_info: bool = False
    """Write metadata_cache.json (captions and sizes) in image_dir."""
    alpha_mask: bool = False
    """Use the PNG alpha channel as loss mask (subset-only)."""
    metadata_file: str | None = None
    """Fine-tuning metadata JSON/JSONL (captions, tags, sizes)."""
    conditioning_data_dir: str | None = None
    """Conditioning images (ControlNet; with masked loss, the R channel is the mask)."""
    shuffle_caption: bool = False
    """Shuffle the caption's tags every step."""
    caption_separator: str = ","
    """Tag separator used by shuffling, dropout and keep_tokens."""
    keep_tokens: int = 0
    """Leading tags kept in place when shuffling."""
    keep_tokens_separator: str | None = None
    """Splits the caption into fixed / shuffled / fixed-suffix parts (e.g. "|||")."""
    secondary_separator: str | None = None
    """Replaced by caption_separator after shuffling and dropout."""
    enable_wildcard: bool = False
    """{a|b} picks one alternative at random; multi-line captions pick a random line."""
    caption_prefix: str | None = None
    """Text put before every caption."""
    caption_suffix: str | None = None
    """Text put after every caption."""
    color_aug: bool = False
    """Random hue augmentation."""
    flip_aug: bool = False
    """Random horizontal flip."""
    face_crop_aug_range: tuple[float, float] | None = None
    """Face crop scale range (low, high): the face (NAME_CX_CY_W_H file names) spans 1/high..1/low of the short
    side; without buckets only, and per step (cache_latents off)."""
    random_crop: bool = False
    """Random instead of centre crop to the bucket."""
    token_warmup_min: int = 1
    """Tags used at the start of token warm-up."""
    token_warmup_step: float = 0.0
    """Steps (or, below 1, fraction of the training) until all tags are used; 0: no warm-up."""
    caption_dropout_rate: float = 0.0
    """Probability of training with an empty caption."""
    caption_dropout_every_n_epochs: int = 0
    """Drop all captions every N epochs; 0: never."""
    caption_tag_dropout_rate: float = 0.0
    """Probability of dropping each tag."""
    custom_attributes: dict | None = None
    """Free-form attributes passed to the trainer (e.g. diff_output_preservation = true)."""
    resize_interpolation: str | None = None
    """Resize filter (one of INTERPOLATIONS); None: area when downscaling, lanczos when upscaling."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DatasetConfig:
    """One [[datasets]] table, merged with [general]."""

    resolution: tuple[int, int]
    """Training resolution (W, H); an int n in the file means (n, n)."""
    batch_size: int = 1
    """Batch size for this dataset's batches."""
    enable_bucket: bool = False
    """Aspect-ratio buckets instead of one fixed size."""
    min_bucket_reso: int = 256
    """Smallest bucket side."""
    max_bucket_reso: int = 1024
    """Largest bucket side."""
    bucket_reso_steps: int = 64
    """Bucket side granularity."""
    bucket_no_upscale: bool = False
    """Per-image buckets that never upscale."""
    network_multiplier: float = 1.0
    """LoRA multiplier for this dataset's samples."""
    validation_split: float = 0.0
    """Fraction of the images held out for validation loss, in [0, 1)."""
    validation_seed: int | None = None
    """Seed of the validation split; None: the training seed."""
    resize_interpolation: str | None = None
    """Resize filter for this dataset (subsets may override it)."""
    subsets: tuple[SubsetConfig, ...]
    """The subsets (at least one)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DatasetsConfig:
    """The whole dataset config."""

    datasets: tuple[DatasetConfig, ...]
    """The datasets, in file order."""
    source: str
    """The file (or "config.yaml:dataset") it came from, for messages."""


_SUBSET_KEYS = frozenset(f.name for f in dataclasses.fields(SubsetConfig))
_DATASET_KEYS = frozenset(f.name for f in dataclasses.fields(DatasetConfig)) - {"subsets"}
_SUBSET_ONLY = frozenset({"image_dir", "is_reg", "alpha_mask"})
_DATASET_ONLY = _DATASET_KEYS - _SUBSET_KEYS
_UPPER_KEYS = (_DATASET_KEYS | _SUBSET_KEYS) - _SUBSET_ONLY  # allowed in [general] and [[datasets]]
_HINTS = {**typing.get_type_hints(SubsetConfig), **typing.get_type_hints(DatasetConfig)}

_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_repeats": (lambda v: v >= 0, ">= 0 (0 ignores the subset)"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "min_bucket_reso": (lambda v: v >= 1, ">= 1"),
    "max_bucket_reso": (lambda v: v >= 1, ">= 1"),
    "bucket_reso_steps": (lambda v: v >= 1, ">= 1"),
    "keep_tokens": (lambda v: v >= 0, ">= 0"),
    "token_warmup_min": (lambda v: v >= 0, ">= 0"),
    "token_warmup_step": (lambda v: v >= 0, ">= 0"),
    "caption_dropout_every_n_epochs": (lambda v: v >= 0, ">= 0"),
    "caption_dropout_rate": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "caption_tag_dropout_rate": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "validation_split": (lambda v: 0 <= v < 1, "in [0, 1) (1.0 or more leaves nothing to train on)"),
    "resolution": (lambda v: min(v) >= 1, "positive"),
    "face_crop_aug_range": (lambda v: 0 < v[0] <= v[1], "[low, high] with 0 < low <= high"),
    "caption_separator": (lambda v: v != "", "a non-empty string"),
    "caption_extension": (
        lambda v: "/" not in v and "\\" not in v and v.strip(".") != "",
        "a file extension such as .txt (no path separator: captions lie beside their images)",
    ),
    "resize_interpolation": (lambda v: v in INTERPOLATIONS, "one of " + ", ".join(INTERPOLATIONS)),
}


def load_dataset_toml(path: str | Path, defaults: Mapping[str, Any] | None = None) -> DatasetsConfig:
    """Read and validate a dataset config, TOML or (``.json``) JSON as the reference reads; every error names the
    file. ``defaults``: values below [general] (the reference's command-line fallbacks, e.g. batch_size from
    --train_batch_size). The result is remembered per file version (path, size, mtime) and defaults: the
    Snakefile asks for it several times while it is parsed, in every job."""
    path = Path(path)
    frozen = tuple(sorted((defaults or {}).items()))
    try:
        stat = path.stat()
    except OSError:
        return _load_dataset_toml(path, -1, -1, frozen)  # reports the problem
    return _load_dataset_toml(path, stat.st_size, stat.st_mtime_ns, frozen)


@functools.lru_cache(maxsize=8)
def _load_dataset_toml(path: Path, size: int, mtime_ns: int, defaults: tuple[tuple[str, Any], ...]) -> DatasetsConfig:
    is_json = path.suffix.lower() == ".json"
    try:
        with path.open("rb") as f:
            data = json.load(f) if is_json else tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: dataset config not found") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from e
    except ValueError as e:  # json.JSONDecodeError
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the dataset config ({e.strerror or e})") from e
    return parse_datasets(data, str(path), dict(defaults))


def parse_datasets(data: Mapping, source: str, defaults: Mapping[str, Any] | None = None) -> DatasetsConfig:
    """Validate the [general]/[[datasets]]/[[datasets.subsets]] structure given as a mapping; ``defaults``
    (dataset- or subset-level keys) rank below [general], as the reference's command-line values do."""
    try:
        datasets = _parse(data, defaults or {})
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e
    return DatasetsConfig(datasets=datasets, source=source)


def folder_datasets(train_data_dir: str, reg_data_dir: str | None = None, in_json: str | None = None) -> dict:
    """The reference's dataset without a config file, as a [[datasets]] mapping: with ``in_json`` one fine-tuning
    subset (the metadata file, images under ``train_data_dir``); else one DreamBooth subset per ``N_concept``
    subfolder of ``train_data_dir`` (num_repeats N, class_tokens "concept") and of ``reg_data_dir`` (is_reg).
    Subfolders without a leading number are left out (with a warning), as by the reference."""
    if in_json is not None:
        return {"datasets": [{"subsets": [{"image_dir": train_data_dir, "metadata_file": in_json}]}]}
    subsets = _concept_subsets(train_data_dir, "--train_data_dir", False)
    if reg_data_dir is not None:
        subsets += _concept_subsets(reg_data_dir, "--reg_data_dir", True)
    return {"datasets": [{"subsets": subsets}]}


def _concept_subsets(folder: str, flag: str, is_reg: bool) -> list[dict[str, Any]]:
    base = Path(folder)
    if not base.is_dir():
        raise ConfigError(f"{flag} {folder}: not a folder")
    subsets = []
    for sub in sorted(p for p in base.iterdir() if p.is_dir()):
        repeats, _, concept = sub.name.partition("_")
        if not repeats.isdigit():
            logging.getLogger(__name__).warning("%s: %s has no leading repeat count (N_concept), left out", flag, sub)
            continue
        if int(repeats) >= 1:
            subsets.append(
                {"image_dir": str(sub), "num_repeats": int(repeats), "is_reg": is_reg, "class_tokens": concept}
            )
    if not subsets:
        raise ConfigError(
            f"{flag} {folder}: no subfolder named N_concept (N repeats >= 1, e.g. 10_sks dog) holds "
            "the images; make one, or use --dataset_config"
        )
    return subsets


def dataset_kind(ds: DatasetConfig) -> str:
    """ "controlnet" (all subsets have conditioning_data_dir), "finetune" (all have metadata_file) or "dreambooth"."""
    return _kind(ds.subsets)


def check_cacheable(cfg: DatasetsConfig, *, cache_latents: bool, cache_text: bool) -> None:
    """Raise ConfigError for the first subset option that the requested caches cannot honour.

    Subsets with num_repeats = 0 are ignored (as by the reference). Caption prefix, suffix and augmentation are
    allowed: fluxpipe caches the augmented captions (the reference refuses or ignores them with cached outputs).
    """
    rules = (_LATENT_RULES if cache_latents else ()) + (_TEXT_RULES if cache_text else ())
    for i, ds in enumerate(cfg.datasets):
        for j, sub in enumerate(ds.subsets):
            if sub.num_repeats == 0:
                continue
            for option, blocked, reason in rules:
                if blocked(ds, sub):
                    value = getattr(sub, option)
                    raise ConfigError(
                        f"{cfg.source}: datasets[{i}].subsets[{j}].{option} = {value!r} "
                        f"(subset {sub.image_dir or sub.metadata_file!r}): {reason}"
                    )


_FRESH_LATENT = (
    "needs a fresh latent every step, which the latent cache cannot give: turn cache_latents off (and "
    "cache_latents_to_disk) for this run (in the pipeline: in its train section of config.yaml); training then "
    "encodes this subset's images each step"
)
_Rule = tuple[str, Callable[[DatasetConfig, SubsetConfig], bool], str]
_LATENT_RULES: tuple[_Rule, ...] = (
    ("color_aug", lambda d, s: s.color_aug, _FRESH_LATENT),
    ("random_crop", lambda d, s: s.random_crop, _FRESH_LATENT),
    # (with buckets the reference ignores it: see _warn_ignored)
    ("face_crop_aug_range", lambda d, s: s.face_crop_aug_range is not None and not d.enable_bucket, _FRESH_LATENT),
)
_TEXT_RULES: tuple[_Rule, ...] = (
    (
        "token_warmup_step",
        lambda d, s: s.token_warmup_step > 0,
        "token warm-up changes the caption with the training step, which cached text-encoder outputs cannot "
        "follow: turn off cache_text_encoder_outputs (in the pipeline: in its train section of config.yaml; "
        "training then encodes each step's captions) or remove the option",
    ),
)


def _parse(data: Any, defaults: Mapping[str, Any]) -> tuple[DatasetConfig, ...]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a table with [general] and [[datasets]], got {type(data).__name__}")
    for key in data:
        if key not in ("general", "datasets"):
            raise ConfigError(f"{key}: unknown top-level key; expected [general] and [[datasets]]")
    general = {
        **_read_level(defaults, _DATASET_KEYS | _SUBSET_KEYS, "command line"),
        **_read_level(data.get("general") or {}, _UPPER_KEYS, "general"),
    }
    tables = data.get("datasets")
    if tables is None:
        raise ConfigError("no [[datasets]]: add at least one dataset with resolution and a [[datasets.subsets]]")
    if not isinstance(tables, (list, tuple)) or not tables:
        raise ConfigError(f"datasets: expected a non-empty array of tables ([[datasets]]), got {tables!r}")
    return tuple(_dataset(t, general, f"datasets[{i}]") for i, t in enumerate(tables))


def _dataset(table: Any, general: dict[str, Any], where: str) -> DatasetConfig:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table, got {table!r}")
    own = {k: v for k, v in table.items() if k != "subsets"}
    level = {**general, **_read_level(own, _UPPER_KEYS, where)}
    tables = table.get("subsets")
    if not tables:
        raise ConfigError(
            f"{where}: no [[datasets.subsets]]; a dataset needs at least one subset with image_dir or metadata_file"
        )
    if not isinstance(tables, (list, tuple)):
        raise ConfigError(f"{where}.subsets: expected an array of tables ([[datasets.subsets]]), got {tables!r}")
    subsets = tuple(_subset(t, level, f"{where}.subsets[{j}]") for j, t in enumerate(tables))
    try:
        _kind(subsets)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e
    if "resolution" not in level:
        raise ConfigError(f"{where}.resolution: required; set it in [[datasets]] or [general] (e.g. 1024)")
    ds = DatasetConfig(**{k: v for k, v in level.items() if k in _DATASET_KEYS}, subsets=subsets)
    _check_buckets(ds, where)
    _warn_ignored(ds, where)
    return ds


def _warn_ignored(ds: DatasetConfig, where: str) -> None:
    """face_crop_aug_range with enable_bucket: the reference crops around the face only without buckets."""
    faces = [j for j, s in enumerate(ds.subsets) if s.face_crop_aug_range is not None and s.num_repeats]
    if ds.enable_bucket and faces:
        logging.getLogger(__name__).warning(
            "%s: face_crop_aug_range (subsets %s) has no effect with enable_bucket (as in the reference: bucketed "
            "images are scaled and cropped to their bucket); set enable_bucket = false to crop around the faces",
            where,
            _idx(faces),
        )


def _subset(table: Any, inherited: dict[str, Any], where: str) -> SubsetConfig:
    own = _read_level(table, _SUBSET_KEYS, where)
    sub = SubsetConfig(**{**{k: v for k, v in inherited.items() if k in _SUBSET_KEYS}, **own})
    if sub.image_dir is None and sub.metadata_file is None:
        raise ConfigError(f"{where}: set image_dir (DreamBooth/ControlNet) or metadata_file (fine-tuning)")
    if sub.cache_info:
        raise ConfigError(
            f"{where}.cache_info: not supported (fluxpipe never writes metadata_cache.json into "
            "image folders; its manifest already caches sizes and captions by content hash): remove it"
        )
    for key, value in (sub.custom_attributes or {}).items():
        if key != "diff_output_preservation":
            raise ConfigError(
                f"{where}.custom_attributes.{key}: unknown attribute (the FLUX trainer reads only "
                "diff_output_preservation): remove it"
            )
        if not isinstance(value, bool):
            raise ConfigError(
                f"{where}.custom_attributes.diff_output_preservation: expected true or false, got {value!r}"
            )
    return sub


def preserves_output(sub: SubsetConfig) -> bool:
    """custom_attributes diff_output_preservation = true: the subset trains towards the base model's prediction."""
    return bool((sub.custom_attributes or {}).get("diff_output_preservation"))


def _read_level(table: Any, allowed: frozenset[str], where: str) -> dict[str, Any]:
    """Type-check and convert one table's keys at their own location; null values count as unset."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table, got {table!r}")
    out: dict[str, Any] = {}
    for key, raw in table.items():
        if key not in allowed:
            raise ConfigError(_misplaced(str(key), allowed, f"{where}.{key}"))
        if raw is not None:
            out[key] = _value(key, raw, f"{where}.{key}")
    return out


def _misplaced(key: str, allowed: frozenset[str], where: str) -> str:
    if key in _DATASET_ONLY:
        return f"{where}: a dataset-level key; set it in [[datasets]] or [general], not in a subset"
    if key in _SUBSET_ONLY:
        return f"{where}: a subset-only key; set it in each [[datasets.subsets]]"
    close = difflib.get_close_matches(key, allowed, n=1)
    return f"{where}: unknown key" + (f"; did you mean {close[0]}?" if close else "")


def _value(key: str, raw: Any, where: str) -> Any:
    """One converted, range-checked value (resolution int -> (n, n); caption_extension gets its dot)."""
    if key == "resolution":
        value: Any = _resolution(raw, where)
    elif key == "face_crop_aug_range":
        value = _pair(raw, float, where)
    else:
        hint = _HINTS[key]
        options = [o for o in typing.get_args(hint) if o is not type(None)] or [hint]
        value = convert(raw, options[0] if len(options) == 1 else hint, where)
    if key in _RULES:
        ok, wanted = _RULES[key]
        if not ok(value):
            raise ConfigError(f"{where}: must be {wanted}, got {value!r}")
    if key == "caption_extension" and value and not value.startswith("."):
        value = "." + value
    return value


def _resolution(raw: Any, where: str) -> tuple[int, int]:
    if isinstance(raw, str):
        raise ConfigError(
            f"{where}: got the string {raw!r}; write an int or a [W, H] array, "
            f"e.g. resolution = 1024 or resolution = [1024, 1024]"
        )
    if isinstance(raw, int) and not isinstance(raw, bool):
        return (raw, raw)
    return _pair(raw, int, where)


def _pair(raw: Any, item: type, where: str) -> tuple[Any, Any]:
    if not isinstance(raw, (list, tuple)) or len(raw) != 2:
        raise ConfigError(f"{where}: expected a 2-element array, got {raw!r}")
    return (convert(raw[0], item, f"{where}[0]"), convert(raw[1], item, f"{where}[1]"))


def _check_buckets(ds: DatasetConfig, where: str) -> None:
    """Bucket range sanity, as the reference asserts it (min/max snapped to bucket_reso_steps)."""
    if ds.min_bucket_reso > ds.max_bucket_reso:
        raise ConfigError(f"{where}: min_bucket_reso {ds.min_bucket_reso} > max_bucket_reso {ds.max_bucket_reso}")
    if not ds.enable_bucket:
        return
    steps = ds.bucket_reso_steps
    low = ds.min_bucket_reso - ds.min_bucket_reso % steps
    high = ds.max_bucket_reso + (-ds.max_bucket_reso) % steps
    if min(ds.resolution) < low or max(ds.resolution) > high:
        w, h = ds.resolution
        raise ConfigError(
            f"{where}.resolution: {w}x{h} lies outside the bucket range {low}..{high} "
            f"(min_bucket_reso/max_bucket_reso rounded to bucket_reso_steps {steps}); "
            f"widen the range or change the resolution"
        )


def _kind(subsets: tuple[SubsetConfig, ...]) -> str:
    """Dataset type from its subsets; mixed kinds raise ConfigError naming the subsets."""
    cond = [j for j, s in enumerate(subsets) if s.conditioning_data_dir is not None]
    meta = [j for j, s in enumerate(subsets) if s.metadata_file is not None]
    others = [j for j in range(len(subsets)) if j not in meta]
    if cond and len(cond) < len(subsets):
        rest = [j for j in range(len(subsets)) if j not in cond]
        raise ConfigError(
            f"subsets {_idx(cond)} have conditioning_data_dir but {_idx(rest)} do not; a ControlNet "
            f"dataset needs it in every subset (put the others in a separate [[datasets]])"
        )
    if cond and meta:
        raise ConfigError(
            f"subsets {_idx(meta)}: metadata_file is not used by ControlNet datasets "
            f"(every subset has conditioning_data_dir)"
        )
    if cond:
        return "controlnet"
    if meta and others:
        raise ConfigError(
            f"subsets {_idx(meta)} have metadata_file (fine-tuning) but {_idx(others)} do not "
            f"(DreamBooth caption files); put them in separate [[datasets]]"
        )
    if meta:
        regs = [j for j, s in enumerate(subsets) if s.is_reg]
        if regs:
            raise ConfigError(f"subsets {_idx(regs)}: is_reg is for DreamBooth subsets, not fine-tuning ones")
        return "finetune"
    return "dreambooth"


def _idx(indices: list[int]) -> str:
    return ", ".join(str(j) for j in sorted(indices))


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def non_utf8_names(folder: str | Path, names: Iterable[str]) -> list[str]:
    """The names (as ``os.fsencode`` bytes reprs, with the folder) that are not valid UTF-8: the file system
    handed them over with surrogate escapes, which Parquet, JSON and Snakemake's lock files cannot store."""
    out = []
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            out.append(f"{folder}/{os.fsencode(name)!r}")
    return out


def refuse_non_utf8(bad: list[str]) -> None:
    """One error listing every file name that is not UTF-8, and how to rename them."""
    if bad:
        raise ConfigError(
            f"{len(bad)} dataset file names are not valid UTF-8: {', '.join(sorted(bad))}; rename "
            "them to UTF-8 (e.g. `convmv -f latin1 -t utf8 --notest -r FOLDER`), then rerun"
        )


"""Image file extensions the reference trainer reads (matched case-insensitively)."""
