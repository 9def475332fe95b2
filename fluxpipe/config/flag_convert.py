"""Conversions between the reference's flag values and fluxpipe's: ``--config_file`` TOML values in the type each flag
has on the command line, the dataset flags as dataset-config keys, and a namespace as plain values."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from fluxpipe.config.flag_table import int_or_float
from fluxpipe.errors import FluxpipeError

_TOML_TYPES: dict[Any, tuple[type, ...]] = {
    str: (str, int, float),
    int: (int,),
    float: (int, float),
    Path: (str,),
    int_or_float: (int, float, str),
}


def _coerce_one(kind: Any, value: Any, where: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, _TOML_TYPES[kind]):
        raise FluxpipeError(f"{where}: {value!r} is not a valid {kind.__name__} value")
    if kind is str:
        return str(value)
    if kind is float and isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return kind(value)
        except (ValueError, argparse.ArgumentTypeError) as error:
            raise FluxpipeError(f"{where}: {error}") from None
    return value


def _coerce(action: argparse.Action, value: Any, where: str) -> Any:
    """A TOML value in the type the flag has on the command line (argparse would not convert it)."""
    if action.nargs == 0:  # store_true
        if not isinstance(value, bool):
            raise FluxpipeError(f"{where}: {value!r} must be true or false")
        return value
    if action.nargs == "*":
        return [_coerce_one(action.type, v, where) for v in (value if isinstance(value, list) else [value])]
    return _coerce_one(action.type, value, where)


def load_config_file(config_file: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """``--config_file``: a TOML (".toml" appended when missing, as the reference does) whose tables are flattened
    into flag values. Unknown keys, keys set twice and values of the wrong type raise naming the key and file."""
    path = Path(config_file if config_file.endswith(".toml") else config_file + ".toml")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise FluxpipeError(f"--config_file {path}: cannot read it ({error.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise FluxpipeError(f"--config_file {path}: not valid TOML ({error})") from None
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for section, body in data.items():
        table = f"[{section}]" if isinstance(body, dict) else "top level"
        for key, value in body.items() if isinstance(body, dict) else [(section, body)]:
            if key not in actions:
                raise FluxpipeError(
                    f"{path}: unknown key {key!r} in {table} (keys are the flag names without dashes; see --help)"
                )
            if key in values:
                raise FluxpipeError(f"{path}: key {key!r} is set twice ({origin[key]} and {table})")
            values[key], origin[key] = _coerce(actions[key], value, f"{path}: {key}"), table
    return values


# the reference's command-line fallbacks of dataset and subset keys (spec §9: subset > dataset > general > command
# line > defaults; --train_batch_size is batch_size, --dataset_repeats num_repeats), and its folder-mode flags
DATASET_FLAGS = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"} | {
    k: k
    for k in """
resolution enable_bucket min_bucket_reso max_bucket_reso bucket_no_upscale bucket_reso_steps resize_interpolation
caption_extension caption_separator shuffle_caption keep_tokens keep_tokens_separator secondary_separator
enable_wildcard caption_prefix caption_suffix token_warmup_min token_warmup_step caption_dropout_rate
caption_dropout_every_n_epochs caption_tag_dropout_rate color_aug flip_aug face_crop_aug_range random_crop alpha_mask
cache_info""".split()
}
FOLDER_FLAGS = ("train_data_dir", "reg_data_dir", "in_json")


def _numbers(flag: str, value: str, kind: type) -> tuple:
    """--resolution "SIZE" or "W,H" (ints), --face_crop_aug_range "LOW,HIGH" (floats), as the reference splits them."""
    sizes, form = ((1, 2), "SIZE or W,H (e.g. 512 or 768,512)") if kind is int else ((2,), "LOW,HIGH (e.g. 2.0,4.0)")
    try:
        parts = tuple(kind(v) for v in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) not in sizes:
        raise FluxpipeError(f"--{flag} {value!r}: write {form}")
    return parts * 2 if len(parts) == 1 else parts


def dataset_flag_defaults(ns: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> dict[str, object]:
    """The dataset/subset values the command line sets away from the parser's defaults, by dataset key."""
    if parser is None:
        from fluxpipe.config.reference_flags import build_parser  # (the parser is built from this module's peers)

        parser = build_parser()
    out: dict[str, object] = {}
    for flag, key in DATASET_FLAGS.items():
        value = getattr(ns, flag)
        if value is None or value == parser.get_default(flag):
            continue
        if flag in ("resolution", "face_crop_aug_range"):
            value = _numbers(flag, value, int if flag == "resolution" else float)
        out[key] = value
    return out


def given_dataset_flags(ns: argparse.Namespace) -> list[str]:
    """The dataset flags (fallbacks and folder mode) set on the command line, as --names."""
    keys = set(dataset_flag_defaults(ns))
    return [f"--{f}" for f, k in DATASET_FLAGS.items() if k in keys] + [
        f"--{f}" for f in FOLDER_FLAGS if getattr(ns, f) is not None
    ]


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def namespace_to_dict(ns: argparse.Namespace) -> dict[str, Any]:
    """Flag values as plain Python values (paths as str, lists copied), keyed by flag name without dashes."""
    return {key: _plain(value) for key, value in sorted(vars(ns).items())}
