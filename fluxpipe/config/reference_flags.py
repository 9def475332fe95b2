"""The command line of kohya-ss/sd-scripts ``flux_train_network.py``, accepted as a drop-in (spec §10).

``build_parser()`` knows every flag that applies to the LoRA script ("L" in spec §10) with the reference's names,
types, nargs and defaults, grouped as the spec groups them. ``parse_train_args(argv)`` adds what the reference does
around argparse: ``--config_file x.toml`` (sections flattened, flags given on the command line win), legacy aliases
and implied flags; it then refuses what fluxpipe will not do and validates values, each failure one
``FluxpipeError`` line naming the flag (never ``sys.exit``). ``namespace_to_dict`` hands plain values to the trainer.

The parts live beside it: the flag table in ``flag_table``, the departures and allowed values in ``flag_rules``,
the TOML and dataset conversions in ``flag_convert``, the optimizer / scheduler / network names in ``names``
(re-exported here). Deliberate departures from the reference, for the README: ``CHANGED_DEFAULTS`` (spec §4.2-4.4, §14.2, §15),
``REJECTED`` (SD-only or deprecated flags) and ``IGNORED_FOR_FLUX`` (accepted with a warning; the reference is silent).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, NoReturn

from fluxpipe.errors import FluxpipeError

from fluxpipe.config.flag_convert import (  # noqa: F401 - re-exported: the parser's public names live here
    DATASET_FLAGS,
    FOLDER_FLAGS,
    dataset_flag_defaults,
    given_dataset_flags,
    load_config_file,
    namespace_to_dict,
)
from fluxpipe.config.flag_rules import (  # noqa: F401
    CHANGED_DEFAULTS,
    CHOICE_HINTS,
    CHOICES,
    EXTENSION_HELP,
    IGNORED_FOR_FLUX,
    POSITIVE_OR_UNSET,
    REJECTED,
)
from fluxpipe.config.flag_table import FLAG, FLOATS, GROUPS, STRS, int_or_float  # noqa: F401
from fluxpipe.config.names import (  # noqa: F401
    LR_SCHEDULERS,
    NETWORK_MODULES,
    OPTIMIZERS,
    canonical_optimizer,
    check_network,
    check_optimizer_available,
    import_class,
)

logger = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors (unknown flag, bad value) raise FluxpipeError instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise FluxpipeError(message)


DEFAULT_SEED = 42  # --seed when none is given


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
    ns.optimizer_type = canonical_optimizer(name or "AdamW")
    if "." in ns.optimizer_type:  # module.Class import path (spec §8.1 "any other"): importable now, not after loading
        import_class(ns.optimizer_type, "optimizer_type")
    check_optimizer_available(ns.optimizer_type)


def _check_scheduler(ns: argparse.Namespace) -> None:
    """--lr_scheduler adafactor needs Adafactor; --lr_scheduler_type module.Class (or a torch.optim.lr_scheduler
    class name, as the reference) must import, and takes no warmup (the reference's check)."""
    if ns.lr_scheduler == "adafactor" and ns.optimizer_type != "Adafactor":
        _fail(
            "lr_scheduler",
            f"adafactor is Adafactor's own schedule: needs --optimizer_type Adafactor, not {ns.optimizer_type}",
        )
    if ns.lr_scheduler == "piecewise_constant" and not any(
        a.startswith("step_rules=") for a in ns.lr_scheduler_args or []
    ):
        _fail(
            "lr_scheduler",
            "piecewise_constant needs --lr_scheduler_args step_rules=... (e.g. step_rules=1:10,0.1:20,0.01)",
        )
    if not ns.lr_scheduler_type:
        return
    path = ns.lr_scheduler_type if "." in ns.lr_scheduler_type else f"torch.optim.lr_scheduler.{ns.lr_scheduler_type}"
    import_class(path, "lr_scheduler_type")
    if ns.lr_warmup_steps:
        _fail(
            "lr_warmup_steps", "a --lr_scheduler_type class takes no warmup steps (the reference refuses): leave it out"
        )


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
    if ns.network_module is None:
        _fail("network_module", f"is required: one of {', '.join(NETWORK_MODULES)}")
    check_network(ns.network_module, list(ns.network_args or []))


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
    ns.seed = DEFAULT_SEED if ns.seed is None else ns.seed  # deterministic by default (the reference draws one)
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
    _check_scheduler(ns)
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
