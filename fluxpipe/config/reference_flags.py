"""The command line of kohya-ss/sd-scripts ``flux_train_network.py``, accepted as a drop-in (spec §10).

``build_parser()`` knows every flag that applies to the LoRA script ("L" in spec §10) with the reference's names,
types, nargs and defaults, grouped as the spec groups them. ``parse_train_args(argv)`` adds what the reference does
around argparse: ``--config_file x.toml`` (sections flattened, flags given on the command line win), legacy aliases
and implied flags; it then refuses what fluxpipe will not do and validates values, each failure one
``FluxpipeError`` line naming the flag (never ``sys.exit``). ``namespace_to_dict`` hands plain values to the trainer.

Deliberate departures from the reference, for the README: ``CHANGED_DEFAULTS`` (spec §4.2-4.4, §14.2, §15),
``REJECTED`` (SD-only or deprecated flags) and ``IGNORED_FOR_FLUX`` (accepted with a warning; the reference is silent).
"""

from __future__ import annotations

import argparse
import logging
import tomllib
from pathlib import Path
from typing import Any, NoReturn

from fluxpipe.errors import FluxpipeError

logger = logging.getLogger(__name__)


def int_or_float(value: str) -> int | float:
    """The reference's type of --lr_warmup_steps/--lr_decay_steps: steps (int), a fraction (float < 1) or "N%"."""
    try:
        if value.endswith("%"):
            return float(value[:-1]) / 100.0
        return int(value) if float(value) >= 1 else float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid int_or_float value: {value!r} (steps, a fraction below 1, or a percentage)"
        ) from None


FLAG, STRS, FLOATS = "store_true", "str*", "float*"  # kinds besides str/int/float/Path/int_or_float

# (name, kind[, default]); a missing default is None (False for FLAG). Order and grouping as in spec §10.
GROUPS: tuple[tuple[str, tuple[tuple[Any, ...], ...]], ...] = (
    (
        "models / FLUX-specific (spec §10.1)",
        (
            ("pretrained_model_name_or_path", str),
            ("clip_l", str),
            ("t5xxl", str),
            ("ae", str),
            ("model_type", str, "flux"),
            ("controlnet_model_name_or_path", str),
            ("t5xxl_max_token_length", int),
            ("apply_t5_attn_mask", FLAG),
            ("guidance_scale", float, 1.0),
            ("timestep_sampling", str, "flux_shift"),
            ("sigmoid_scale", float, 1.0),
            ("model_prediction_type", str, "raw"),
            ("discrete_flow_shift", float, 3.0),
            ("v2", FLAG),
            ("v_parameterization", FLAG),
            ("tokenizer_cache_dir", str),
            ("split_mode", FLAG),
        ),
    ),
    (
        "DiT / caching / offload (spec §10.2)",
        (
            ("cache_text_encoder_outputs", FLAG),
            ("cache_text_encoder_outputs_to_disk", FLAG),
            ("text_encoder_batch_size", int),
            ("disable_mmap_load_safetensors", FLAG),
            ("weighting_scheme", str, "uniform"),
            ("logit_mean", float, 0.0),
            ("logit_std", float, 1.0),
            ("mode_scale", float, 1.29),
            ("blocks_to_swap", int),
            ("cpu_offload_checkpointing", FLAG),
        ),
    ),
    (
        "dataset (spec §10.3)",
        (
            ("train_data_dir", str),
            ("reg_data_dir", str),
            ("in_json", str),
            ("dataset_repeats", int, 1),
            ("dataset_config", Path),
            ("dataset_class", str),
            ("resolution", str),
            ("enable_bucket", FLAG),
            ("min_bucket_reso", int, 256),
            ("max_bucket_reso", int, 1024),
            ("bucket_reso_steps", int, 64),
            ("bucket_no_upscale", FLAG),
            ("resize_interpolation", str),
            ("caption_extension", str, ".caption"),
            ("caption_extention", str),
            ("caption_separator", str, ","),
            ("shuffle_caption", FLAG),
            ("keep_tokens", int, 0),
            ("keep_tokens_separator", str, ""),
            ("secondary_separator", str),
            ("enable_wildcard", FLAG),
            ("caption_prefix", str),
            ("caption_suffix", str),
            ("token_warmup_min", int, 1),
            ("token_warmup_step", float, 0),
            ("caption_dropout_rate", float, 0.0),
            ("caption_dropout_every_n_epochs", int, 0),
            ("caption_tag_dropout_rate", float, 0.0),
            ("color_aug", FLAG),
            ("flip_aug", FLAG),
            ("face_crop_aug_range", str),
            ("random_crop", FLAG),
            ("alpha_mask", FLAG),
            ("cache_latents", FLAG),
            ("cache_latents_to_disk", FLAG),
            ("vae_batch_size", int, 1),
            ("skip_cache_check", FLAG),
            ("cache_info", FLAG),
            ("debug_dataset", FLAG),
            ("conditioning_data_dir", str),
            ("masked_loss", FLAG),
            ("max_token_length", int),
        ),
    ),
    (
        "training loop (spec §10.4)",
        (
            ("output_dir", str),
            ("output_name", str),
            ("save_precision", str),
            ("save_every_n_epochs", int),
            ("save_every_n_steps", int),
            ("save_n_epoch_ratio", int),
            ("save_last_n_epochs", int),
            ("save_last_n_epochs_state", int),
            ("save_last_n_steps", int),
            ("save_last_n_steps_state", int),
            ("save_state", FLAG),
            ("save_state_on_train_end", FLAG),
            ("resume", str),
            ("huggingface_repo_id", str),
            ("huggingface_repo_type", str),
            ("huggingface_path_in_repo", str),
            ("huggingface_token", str),
            ("huggingface_repo_visibility", str),
            ("save_state_to_huggingface", FLAG),
            ("resume_from_huggingface", FLAG),
            ("async_upload", FLAG),
            ("train_batch_size", int, 1),
            ("max_train_steps", int, 1600),
            ("max_train_epochs", int),
            ("gradient_accumulation_steps", int, 1),
            ("seed", int),
            ("max_data_loader_n_workers", int, 8),
            ("persistent_data_loader_workers", FLAG),
            ("gradient_checkpointing", FLAG),
            ("mixed_precision", str, "no"),
            ("full_fp16", FLAG),
            ("full_bf16", FLAG),
            ("fp8_base", FLAG),
            ("lowram", FLAG),
            ("highvram", FLAG),
            ("torch_compile", FLAG),
            ("dynamo_backend", str, "inductor"),
            ("ddp_timeout", int),
            ("ddp_gradient_as_bucket_view", FLAG),
            ("ddp_static_graph", FLAG),
            ("loss_type", str, "l2"),
            ("huber_schedule", str, "snr"),
            ("huber_c", float, 0.1),
            ("huber_scale", float, 1.0),
            ("ip_noise_gamma", float),
            ("ip_noise_gamma_random_strength", FLAG),
            ("noise_offset", float),
            ("noise_offset_random_strength", FLAG),
            ("multires_noise_iterations", int),
            ("multires_noise_discount", float, 0.3),
            ("adaptive_noise_scale", float),
            ("zero_terminal_snr", FLAG),
            ("min_timestep", int),
            ("max_timestep", int),
            ("clip_skip", int),
            ("vae", str),
            ("mem_eff_attn", FLAG),
            ("xformers", FLAG),
            ("sdpa", FLAG),
            ("sample_sampler", str, "ddim"),
            ("sample_every_n_steps", int),
            ("sample_every_n_epochs", int),
            ("sample_at_first", FLAG),
            ("sample_prompts", str),
            ("logging_dir", str),
            ("log_with", str),
            ("log_prefix", str),
            ("log_tracker_name", str),
            ("wandb_run_name", str),
            ("log_tracker_config", str),
            ("wandb_api_key", str),
            ("log_config", FLAG),
            ("console_log_level", str),
            ("console_log_file", str),
            ("console_log_simple", FLAG),
            ("config_file", str),
            ("output_config", FLAG),
            ("prior_loss_weight", float, 1.0),
        ),
    ),
    (
        "optimizer / scheduler (spec §10.5, §8.1-8.2)",
        (
            ("optimizer_type", str, ""),
            ("optimizer_args", STRS),
            ("use_8bit_adam", FLAG),
            ("use_lion_optimizer", FLAG),
            ("learning_rate", float, 2e-6),
            ("max_grad_norm", float, 1.0),
            ("lr_scheduler", str, "constant"),
            ("lr_scheduler_type", str, ""),
            ("lr_scheduler_args", STRS),
            ("lr_warmup_steps", int_or_float, 0),
            ("lr_decay_steps", int_or_float, 0),
            ("lr_scheduler_num_cycles", int, 1),
            ("lr_scheduler_power", float, 1),
            ("lr_scheduler_timescale", int),
            ("lr_scheduler_min_lr_ratio", float),
            ("fused_backward_pass", FLAG),
        ),
    ),
    (
        "network (spec §10.6)",
        (
            ("network_module", str),
            ("network_dim", int),
            ("network_alpha", float, 1),
            ("network_dropout", float),
            ("network_args", STRS),
            ("network_weights", str),
            ("dim_from_weights", FLAG),
            ("network_train_unet_only", FLAG),
            ("network_train_text_encoder_only", FLAG),
            ("unet_lr", float),
            ("text_encoder_lr", FLOATS),
            ("fp8_base_unet", FLAG),
            ("scale_weight_norms", float),
            ("base_weights", STRS),
            ("base_weights_multiplier", FLOATS),
            ("no_half_vae", FLAG),
            ("training_comment", str),
            ("no_metadata", FLAG),
            ("save_model_as", str, "safetensors"),
            ("skip_until_initial_step", FLAG),
            ("initial_epoch", int),
            ("initial_step", int),
            ("validation_seed", int),
            ("validation_split", float, 0.0),
            ("validate_every_n_steps", int),
            ("validate_every_n_epochs", int),
            ("max_validation_steps", int),
        ),
    ),
    (
        "custom train functions, all no-op for FLUX (spec §10.8)",
        (
            ("min_snr_gamma", float),
            ("scale_v_pred_loss_like_noise_pred", FLAG),
            ("v_pred_like_loss", float),
            ("debiased_estimation_loss", FLAG),
            ("weighted_captions", FLAG),
        ),
    ),
    (
        "full fine-tune / ControlNet (spec §6.3, §7)",
        (
            ("blockwise_fused_optimizers", FLAG),
            ("mem_eff_save", FLAG),
            ("fused_optimizer_groups", int),
            ("double_blocks_to_swap", int),
            ("single_blocks_to_swap", int),
        ),
    ),
    (
        "DeepSpeed (spec §10.9)",
        (
            ("deepspeed", FLAG),
            ("zero_stage", int, 2),
            ("offload_optimizer_device", str),
            ("offload_optimizer_nvme_path", str),
            ("offload_param_device", str),
            ("offload_param_nvme_path", str),
            ("zero3_init_flag", FLAG),
            ("zero3_save_16bit_model", FLAG),
            ("fp16_master_weights_and_gradients", FLAG),
        ),
    ),
    (
        "fluxpipe extensions, not in the reference: EMA of the trained weights (fluxpipe.training.ema)",
        (("ema_decay", float), ("ema_update_every", int, 1), ("ema_on_cpu", FLAG), ("ema_for_eval", FLAG)),
    ),
    (
        "ModelSpec metadata (spec §10.10)",
        tuple(
            (f"metadata_{n}", str)
            for n in (
                "title",
                "author",
                "description",
                "license",
                "tags",
                "usage_hint",
                "thumbnail",
                "merged_from",
                "trigger_phrase",
                "preprocessor",
                "is_negative_embedding",
            )
        ),
    ),
)

CHANGED_DEFAULTS: dict[str, tuple[Any, Any, str]] = {
    "--timestep_sampling": (
        "sigma",
        "flux_shift",
        "resolution-dependent shift as BFL trains and samples; the "
        "reference docs recommend shift/flux_shift over its own default (spec §4.2, §14.2)",
    ),
    "--model_prediction_type": (
        "sigma_scaled",
        "raw",
        "only raw pairs a velocity prediction with the velocity "
        "target; sigma_scaled is the 'LoRA has no effect' trap (spec §4.4, §14.2)",
    ),
    "--guidance_scale": (3.5, 1.0, "the reference docs recommend 1.0 for dev LoRA training (spec §4.3, §15)"),
}

REJECTED: dict[str, str] = {
    "v2": "SD-only (Stable Diffusion 2.x); FLUX has no such mode: remove it",
    "v_parameterization": "SD-only (v-prediction); FLUX always predicts the flow velocity: remove it",
    "clip_skip": "SD-only; FLUX uses CLIP-L's pooled output only: remove it",
    "max_token_length": "is for SD's CLIP (the reference ignores it for FLUX): use --t5xxl_max_token_length",
}

IGNORED_FOR_FLUX: tuple[str, ...] = (  # spec §4.2, §10.1-10.8 "no-op" notes; accepted with a warning
    "--noise_offset",
    "--noise_offset_random_strength",
    "--multires_noise_iterations",
    "--multires_noise_discount",
    "--adaptive_noise_scale",
    "--zero_terminal_snr",
    "--min_timestep",
    "--max_timestep",
    "--min_snr_gamma",
    "--debiased_estimation_loss",
    "--scale_v_pred_loss_like_noise_pred",
    "--v_pred_like_loss",
    "--weighted_captions",
    "--sample_sampler",
    "--xformers",
    "--mem_eff_attn",
    "--sdpa",
    "--vae",
    "--controlnet_model_name_or_path",
    "--fused_backward_pass",
)

LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
    "piecewise_constant",
    "adafactor",
)

CHOICES: dict[str, tuple[Any, ...]] = {  # checked after parsing, so TOML values are checked as well
    "model_type": ("flux", "kontext", "chroma"),
    "timestep_sampling": ("sigma", "uniform", "sigmoid", "shift", "flux_shift"),
    "model_prediction_type": ("raw", "additive", "sigma_scaled"),
    "weighting_scheme": ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform"),
    "resize_interpolation": (None, "lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area"),
    "mixed_precision": ("no", "fp16", "bf16"),
    "save_precision": (None, "float", "fp16", "bf16"),
    "loss_type": ("l1", "l2", "huber", "smooth_l1"),
    "huber_schedule": ("constant", "exponential", "snr"),
    "lr_scheduler": LR_SCHEDULERS,
    "save_model_as": ("safetensors",),
    "dynamo_backend": (
        "eager",
        "aot_eager",
        "inductor",
        "aot_ts_nvfuser",
        "nvprims_nvfuser",
        "cudagraphs",
        "ofi",
        "fx2trt",
        "onnxrt",
        "tensort",
        "ipex",
        "tvm",
    ),
    "sample_sampler": (
        "ddim",
        "pndm",
        "lms",
        "euler",
        "euler_a",
        "heun",
        "dpm_2",
        "dpm_2_a",
        "dpmsolver",
        "dpmsolver++",
        "dpmsingle",
        "k_lms",
        "k_euler",
        "k_euler_a",
        "k_dpm_2",
        "k_dpm_2_a",
    ),
    "log_with": (None, "tensorboard", "wandb", "all"),
    "zero_stage": (0, 1, 2, 3),
    "console_log_level": (None, "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
    "offload_optimizer_device": (None, "cpu", "nvme"),
    "offload_param_device": (None, "cpu", "nvme"),
}
CHOICE_HINTS = {
    "model_type": "fluxpipe trains FLUX.1 (flux), FLUX.1 Kontext [dev] (kontext, fluxpipe's own value) and "
    "Chroma (chroma)",
    "save_model_as": "fluxpipe writes safetensors only, never pickle (ckpt/pt)",
}

OPTIMIZERS = (
    "AdamW",
    "AdamW8bit",
    "PagedAdamW8bit",
    "PagedAdamW",
    "PagedAdamW32bit",
    "Lion8bit",
    "PagedLion8bit",
    "SGDNesterov8bit",
    "Lion",
    "SGDNesterov",
    "DAdaptation",
    "DAdaptAdamPreprint",
    "DAdaptAdaGrad",
    "DAdaptAdam",
    "DAdaptAdan",
    "DAdaptAdanIP",
    "DAdaptLion",
    "DAdaptSGD",
    "Prodigy",
    "Adafactor",
    "AdamWScheduleFree",
    "RAdamScheduleFree",
    "SGDScheduleFree",
)
TORCH_OPTIMIZERS = ("Adadelta", "Adagrad", "Adam", "Adamax", "ASGD", "NAdam", "RAdam", "RMSprop", "Rprop", "SGD")
_OPTIMIZER_BY_LOWER = {name.lower(): name for name in OPTIMIZERS + TORCH_OPTIMIZERS}

NETWORK_MODULES = {"networks.lora_flux": "networks.lora_flux", "fluxpipe.lora.network": "networks.lora_flux"}


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors (unknown flag, bad value) raise FluxpipeError instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise FluxpipeError(message)


EXTENSION_HELP = {  # fluxpipe's own flags (the reference has no EMA)
    "ema_decay": "keep an EMA of the trained weights with this decay (0 < d < 1, e.g. 0.999; diffusers' EMAModel "
    "warm-up: min(d, (1 + t) / (10 + t))), saved as <name>-ema.safetensors beside each model file",
    "ema_update_every": "update the EMA every N optimizer steps (needs --ema_decay)",
    "ema_on_cpu": "keep the EMA in host memory (the full fine-tune's EMA is a whole DiT; needs --ema_decay)",
    "ema_for_eval": "samples and the validation loss use the EMA weights (needs --ema_decay)",
}


def _help(name: str) -> str:
    if name in EXTENSION_HELP:
        return EXTENSION_HELP[name] + " (default: %(default)s)"
    if name in REJECTED:
        return f"rejected by fluxpipe: {REJECTED[name]}"
    notes = []
    if f"--{name}" in CHANGED_DEFAULTS:
        reference, _, reason = CHANGED_DEFAULTS[f"--{name}"]
        notes.append(f"reference default {reference!r}: {reason}")
    if name in CHOICES:
        notes.append("one of " + ", ".join(str(c) for c in CHOICES[name]))
    if f"--{name}" in IGNORED_FOR_FLUX:
        notes.append("ignored for FLUX (accepted with a warning)")
    return "; ".join(notes) or "(default: %(default)s)"  # the formatter appends it only to non-empty help


def _add_flag(group: argparse._ArgumentGroup, name: str, kind: Any, default: Any = None) -> None:
    if kind == FLAG:
        group.add_argument(f"--{name}", action="store_true", help=_help(name))
        return
    nargs = "*" if kind in (STRS, FLOATS) else None
    kind = {STRS: str, FLOATS: float}.get(kind, kind)
    group.add_argument(f"--{name}", type=kind, default=default, nargs=nargs, help=_help(name))


def build_parser(prog: str = "fluxpipe train") -> argparse.ArgumentParser:
    """Every flag of the reference's LoRA script (spec §10, "L"), grouped as the spec groups them."""
    parser = _Parser(
        prog=prog,
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        usage="%(prog)s [--config_file X.toml] [flags of sd-scripts flux_train_network.py]",
        description="Train a FLUX.1 LoRA; flags of sd-scripts flux_train_network.py.",
    )
    for title, flags in GROUPS:
        group = parser.add_argument_group(title)
        for flag in flags:
            _add_flag(group, *flag)
    return parser


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
    if kind is str or kind is float:
        return kind(value)
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


def _fail(name: str, message: str) -> NoReturn:
    raise FluxpipeError(f"--{name}: {message}")


def _check_rejected_and_choices(ns: argparse.Namespace) -> None:
    for name, reason in REJECTED.items():
        if getattr(ns, name) not in (None, False):
            _fail(name, reason)
    for name, choices in CHOICES.items():
        value = getattr(ns, name)
        if value not in choices:
            hint = f" ({CHOICE_HINTS[name]})" if name in CHOICE_HINTS else ""
            _fail(name, f"{value!r} is not one of {', '.join(str(c) for c in choices)}{hint}")


def _check_numbers(ns: argparse.Namespace) -> None:
    checks = (
        (
            "blocks_to_swap",
            ns.blocks_to_swap is None or 0 <= ns.blocks_to_swap <= 35,
            "must be 0..35 for FLUX.1 (at most 17 double + 36 single blocks swap, spec §6.1)",
        ),
        ("max_train_steps", ns.max_train_steps > 0, "must be > 0"),
        ("max_train_epochs", ns.max_train_epochs is None or ns.max_train_epochs > 0, "must be > 0"),
        ("gradient_accumulation_steps", ns.gradient_accumulation_steps >= 1, "must be >= 1"),
        ("train_batch_size", ns.train_batch_size >= 1, "must be >= 1"),
        (
            "t5xxl_max_token_length",
            ns.t5xxl_max_token_length is None or 1 <= ns.t5xxl_max_token_length <= 512,
            "must be 1..512 (T5 tokens; empty: 512 for dev, 256 for schnell)",
        ),
    )
    for name, ok, message in checks:
        if not ok:
            _fail(name, f"{getattr(ns, name)!r} {message}")
    for name in POSITIVE_OR_UNSET:
        if getattr(ns, name) is not None and getattr(ns, name) < 1:
            _fail(name, f"{getattr(ns, name)!r} must be >= 1 ({POSITIVE_OR_UNSET[name]})")
    _check_learning_rates(ns)
    _check_output_name(ns.output_name)
    for name in ("lr_warmup_steps", "lr_decay_steps"):
        value = getattr(ns, name)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or value < 0
            or (isinstance(value, float) and value >= 1)
        ):
            _fail(name, f"{value!r} must be a step count (int >= 0) or a fraction of all steps (float < 1, or N%)")
    if ns.lr_scheduler == "constant" and ns.lr_warmup_steps and not ns.lr_scheduler_type:
        _fail(
            "lr_warmup_steps",
            "--lr_scheduler constant takes no warmup (the reference raises); use --lr_scheduler constant_with_warmup",
        )


POSITIVE_OR_UNSET = {  # the reference would train a rank-4 LoRA labelled 0, or save every |n| steps
    "network_dim": "the LoRA rank; leave it out for 4",
    "save_every_n_steps": "leave it out to save no steps",
    "save_every_n_epochs": "leave it out to save no epochs",
    "save_n_epoch_ratio": "leave it out",
    "save_last_n_epochs": "leave it out to keep all",
    "save_last_n_steps": "leave it out to keep all",
    "save_last_n_epochs_state": "leave it out to keep all",
    "save_last_n_steps_state": "leave it out to keep all",
    "sample_every_n_steps": "leave it out for no samples",
    "sample_every_n_epochs": "leave it out for no samples",
    "validate_every_n_steps": "leave it out",
    "validate_every_n_epochs": "leave it out",
    "max_validation_steps": "leave it out for all",
    "vae_batch_size": "leave it out for 1",
    "text_encoder_batch_size": "leave it out",
}


def _check_learning_rates(ns: argparse.Namespace) -> None:
    """No negative rate; and lr 0 only where another group still trains (a group with lr 0 is dropped, as in the
    reference: with every rate 0 the reference stops after loading the models with an empty optimizer)."""
    for name in ("learning_rate", "unet_lr"):
        if getattr(ns, name) is not None and getattr(ns, name) < 0:
            _fail(name, f"{getattr(ns, name)!r} must be >= 0 (e.g. 1e-4 for a LoRA)")
    if any(v < 0 for v in ns.text_encoder_lr or ()):
        _fail("text_encoder_lr", f"{ns.text_encoder_lr!r}: rates must be >= 0")
    unet = ns.unet_lr if ns.unet_lr is not None else ns.learning_rate
    te = [] if ns.network_train_unet_only else (ns.text_encoder_lr or [ns.learning_rate])
    if unet == 0 and not any(te):
        _fail(
            "learning_rate",
            f"{ns.learning_rate!r}: with every learning rate 0 nothing is trained (the reference "
            "stops with an empty optimizer); give a positive rate, e.g. --learning_rate 1e-4",
        )


def _check_output_name(name: str | None) -> None:
    """A file name, not a path: ``../x`` would write (and --save_last_n_* delete) outside --output_dir."""
    if name is not None and (name in ("", ".", "..") or "/" in name or "\\" in name):
        _fail(
            "output_name",
            f"{name!r} must be a plain file name without path separators (files go into "
            "--output_dir): e.g. --output_name my_lora",
        )


def _resolve_optimizer(ns: argparse.Namespace) -> None:
    """Legacy --use_8bit_adam/--use_lion_optimizer and "" resolved as the reference does; names made canonical."""
    name = ns.optimizer_type or ""
    if ns.use_8bit_adam or ns.use_lion_optimizer:
        if ns.use_8bit_adam and ns.use_lion_optimizer:
            _fail("use_8bit_adam", "cannot be combined with --use_lion_optimizer")
        if name:
            _fail("optimizer_type", "cannot be combined with --use_8bit_adam/--use_lion_optimizer: use one")
        name = "AdamW8bit" if ns.use_8bit_adam else "Lion"
    name = name or "AdamW"
    if "." in name:  # module.Class import path, kept as given (spec §8.1 "any other")
        ns.optimizer_type = name
        return
    if name.lower() not in _OPTIMIZER_BY_LOWER:
        _fail(
            "optimizer_type",
            f"unknown optimizer {name!r}: one of {', '.join(OPTIMIZERS + TORCH_OPTIMIZERS)} "
            "(any case), or a module.Class path",
        )
    ns.optimizer_type = _OPTIMIZER_BY_LOWER[name.lower()]


def _check_combinations(ns: argparse.Namespace, method: str = "lora") -> None:
    if ns.blocks_to_swap and ns.cpu_offload_checkpointing:
        _fail("blocks_to_swap", "cannot be combined with --cpu_offload_checkpointing (spec §6.1): use one")
    if ns.fused_backward_pass and ns.optimizer_type != "Adafactor":
        _fail("fused_backward_pass", f"needs --optimizer_type Adafactor, not {ns.optimizer_type}")
    if ns.fused_backward_pass and ns.gradient_accumulation_steps > 1:
        _fail("fused_backward_pass", "cannot be combined with --gradient_accumulation_steps > 1")
    if ns.loss_type in ("huber", "smooth_l1") and ns.huber_schedule == "snr":
        _fail(
            "huber_schedule",
            "snr needs the alphas_cumprod of SD's noise schedule, which FLUX's flow schedule "
            "lacks (the reference raises NotImplementedError): use constant or exponential",
        )
    if ns.full_fp16 and ns.full_bf16:
        _fail("full_fp16", "cannot be combined with --full_bf16")
    for flag, precision in (("full_fp16", "fp16"), ("full_bf16", "bf16")):
        if getattr(ns, flag) and ns.mixed_precision != precision:
            _fail(flag, f"needs --mixed_precision {precision}")
    if ns.blockwise_fused_optimizers and ns.fused_backward_pass:
        _fail("blockwise_fused_optimizers", "cannot be combined with --fused_backward_pass")
    if ns.fused_optimizer_groups:
        _fail(
            "fused_optimizer_groups",
            "is a dead option of the reference (it does nothing): use --blockwise_fused_optimizers",
        )
    if method != "lora":
        return
    if ns.network_module not in NETWORK_MODULES:
        given = "is required" if ns.network_module is None else f"{ns.network_module!r} is not supported"
        _fail(
            "network_module",
            f"{given}: fluxpipe trains LoRA with {' or '.join(NETWORK_MODULES)} (OFT and LyCORIS are not implemented)",
        )


def _check_ema(ns: argparse.Namespace) -> None:
    if ns.ema_decay is None:
        for flag in ("ema_on_cpu", "ema_for_eval"):
            if getattr(ns, flag):
                _fail(flag, "needs --ema_decay D (the EMA's decay, e.g. 0.999)")
        if ns.ema_update_every != 1:
            _fail("ema_update_every", "needs --ema_decay D (the EMA's decay, e.g. 0.999)")
        return
    if not 0.0 < ns.ema_decay < 1.0:
        _fail("ema_decay", f"{ns.ema_decay!r} must be between 0 and 1 (exclusive), e.g. 0.999")
    if ns.ema_update_every < 1:
        _fail("ema_update_every", f"{ns.ema_update_every!r} must be >= 1 (optimizer steps between EMA updates)")


def _apply_implications(ns: argparse.Namespace) -> None:
    """What the reference derives from flags before training (legacy alias, implied flags, spec §3.3, §6.2)."""
    if ns.caption_extention is not None:
        ns.caption_extension, ns.caption_extention = ns.caption_extention, None
    ns.cache_latents = ns.cache_latents or ns.cache_latents_to_disk
    ns.cache_text_encoder_outputs = ns.cache_text_encoder_outputs or ns.cache_text_encoder_outputs_to_disk
    ns.fp8_base = ns.fp8_base or ns.fp8_base_unet
    ns.network_module = NETWORK_MODULES.get(ns.network_module)
    if ns.double_blocks_to_swap or ns.single_blocks_to_swap:  # deprecated full fine-tune options (spec §6.1)
        n = (ns.double_blocks_to_swap or 0) + (ns.single_blocks_to_swap or 0) // 2
        logger.warning("--double_blocks_to_swap/--single_blocks_to_swap are deprecated: using --blocks_to_swap %d", n)
        ns.blocks_to_swap, ns.double_blocks_to_swap, ns.single_blocks_to_swap = n, None, None


def _map_split_mode(ns: argparse.Namespace, method: str) -> None:
    """The deprecated --split_mode of the LoRA script means --blocks_to_swap 18 (spec §10.1), as the reference."""
    if not ns.split_mode:
        return
    if method != "lora":
        _fail("split_mode", "is a (deprecated) option of the LoRA script only: use --blocks_to_swap")
    if ns.blocks_to_swap is not None:
        logger.warning("--split_mode is deprecated and ignored because --blocks_to_swap is set")
    else:
        logger.warning("--split_mode is deprecated: use --blocks_to_swap; using --blocks_to_swap 18")
        ns.blocks_to_swap = 18
    ns.split_mode = False


def ignored_for(method: str) -> tuple[str, ...]:
    """The flags a method accepts and ignores: the full fine-tune uses --fused_backward_pass, ControlNet training
    also --controlnet_model_name_or_path."""
    used = {
        "lora": set(),
        "full": {"--fused_backward_pass"},
        "controlnet": {"--fused_backward_pass", "--controlnet_model_name_or_path"},
    }[method]
    return tuple(f for f in IGNORED_FOR_FLUX if f not in used)


def _warn_ignored(ns: argparse.Namespace, parser: argparse.ArgumentParser, method: str) -> None:
    given = [flag for flag in ignored_for(method) if getattr(ns, flag[2:]) != parser.get_default(flag[2:])]
    if given:
        logger.warning("accepted for compatibility but ignored for FLUX (as by the reference): %s", ", ".join(given))


def validate_train_args(ns: argparse.Namespace, parser: argparse.ArgumentParser, method: str = "lora") -> None:
    """Refuse, validate and normalise a parsed namespace in place (see the module docstring)."""
    _check_rejected_and_choices(ns)
    _map_split_mode(ns, method)
    _check_numbers(ns)
    _resolve_optimizer(ns)
    _check_combinations(ns, method)
    _check_ema(ns)
    _apply_implications(ns)
    dataset_flag_defaults(ns, parser)  # --resolution / --face_crop_aug_range are well-formed
    _warn_ignored(ns, parser, method)


def parse_train_args(argv: list[str], method: str = "lora") -> argparse.Namespace:
    """Parse ``argv`` as flux_train_network.py (method "lora"), flux_train.py ("full") or
    flux_train_control_net.py ("controlnet") would (``--config_file`` first, the command line on top), then
    validate. Any problem raises ``FluxpipeError`` with one line naming the flag (or the TOML key and file)."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.config_file:
        values = load_config_file(ns.config_file, parser)
        ns = parser.parse_args(argv, namespace=argparse.Namespace(**values))
    validate_train_args(ns, parser, method)
    return ns


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
    parser = parser or build_parser()
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
