"""The names fluxpipe accepts for optimizers, LR schedulers and network modules: one table each, read by the flag
parser (refusal at parse time) and by the builders (fluxpipe.training.optim, the network constructors).

Each optimizer name maps to the class the reference trainer builds for it (spec §8.1) and to the pip package and
fluxpipe extra that provide it, so that a missing package is refused before any cache is built or model loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any

from fluxpipe.errors import FluxpipeError


@dataclass(frozen=True)
class OptimizerName:
    """Where the class of one ``--optimizer_type`` lives, its forced defaults and the package providing it."""

    module: str
    cls: str
    defaults: dict[str, Any] = field(default_factory=dict)
    package: str | None = None  # pip name; None: a dependency of fluxpipe itself
    extra: str | None = None  # the fluxpipe extra that installs it


_NESTEROV = {"nesterov": True, "momentum": 0.9}


def _bnb(cls: str, defaults: dict[str, Any] | None = None) -> OptimizerName:
    return OptimizerName("bitsandbytes.optim", cls, defaults or {}, package="bitsandbytes")


def _extra(module: str, cls: str, package: str) -> OptimizerName:
    return OptimizerName(module, cls, package=package, extra="optimizers")


# canonical name -> class; the reference's names (spec §8.1), then the torch.optim classes it reaches by name
OPTIMIZERS: dict[str, OptimizerName] = {
    "AdamW": OptimizerName("torch.optim", "AdamW"),
    "AdamW8bit": _bnb("AdamW8bit"),
    "PagedAdamW8bit": _bnb("PagedAdamW8bit"),
    "PagedAdamW": _bnb("PagedAdamW"),
    "PagedAdamW32bit": _bnb("PagedAdamW32bit"),
    "Lion8bit": _bnb("Lion8bit"),
    "PagedLion8bit": _bnb("PagedLion8bit"),
    "SGDNesterov8bit": _bnb("SGD8bit", _NESTEROV),
    "Lion": _extra("lion_pytorch", "Lion", "lion-pytorch"),
    "SGDNesterov": OptimizerName("torch.optim", "SGD", _NESTEROV),
    "DAdaptation": _extra("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    "DAdaptAdamPreprint": _extra("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    "DAdaptAdaGrad": _extra("dadaptation", "DAdaptAdaGrad", "dadaptation"),
    "DAdaptAdam": _extra("dadaptation", "DAdaptAdam", "dadaptation"),
    "DAdaptAdan": _extra("dadaptation", "DAdaptAdan", "dadaptation"),
    "DAdaptAdanIP": _extra("dadaptation.experimental", "DAdaptAdanIP", "dadaptation"),
    "DAdaptLion": _extra("dadaptation", "DAdaptLion", "dadaptation"),
    "DAdaptSGD": _extra("dadaptation", "DAdaptSGD", "dadaptation"),
    "Prodigy": _extra("prodigyopt", "Prodigy", "prodigyopt"),
    "Adafactor": OptimizerName("transformers.optimization", "Adafactor"),
    "AdamWScheduleFree": _extra("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "RAdamScheduleFree": _extra("schedulefree", "RAdamScheduleFree", "schedulefree"),
    "SGDScheduleFree": _extra("schedulefree", "SGDScheduleFree", "schedulefree"),
    **{
        n: OptimizerName("torch.optim", n)
        for n in ("Adadelta", "Adagrad", "Adam", "Adamax", "ASGD", "NAdam", "RAdam", "RMSprop", "Rprop", "SGD")
    },
}
_OPTIMIZER_BY_LOWER = {name.lower(): name for name in OPTIMIZERS}

# --lr_scheduler (spec §8.2): transformers' schedule names, plus adafactor (Adafactor's own relative schedule)
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


def package_missing(module: str) -> bool:
    """True when the top-level package of ``module`` cannot be imported (checked without importing it)."""
    top = module.partition(".")[0]
    try:
        return importlib.util.find_spec(top) is None
    except (ImportError, ValueError):
        return True


def canonical_optimizer(name: str) -> str:
    """The table's spelling of ``name`` (any case), or a ``module.Class`` path unchanged; FluxpipeError otherwise."""
    if "." in name:
        return name
    if name.lower() not in _OPTIMIZER_BY_LOWER:
        raise FluxpipeError(
            f"--optimizer_type: unknown optimizer {name!r}: one of {', '.join(OPTIMIZERS)} (any case), "
            "or a module.Class path"
        )
    return _OPTIMIZER_BY_LOWER[name.lower()]


def import_class(path: str, flag: str) -> type:
    """``module.Class`` imported (the reference's importlib path); FluxpipeError naming ``flag`` otherwise."""
    module, _, cls = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise FluxpipeError(f"--{flag} {path}: cannot import {module} ({e}); install it or fix the path") from None
    except AttributeError:
        raise FluxpipeError(f"--{flag} {path}: {module} has no {cls!r}; check the class name") from None
    if not isinstance(found, type):
        raise FluxpipeError(f"--{flag} {path}: {path} is not a class")
    return found


def optimizer_class(name: str) -> type:
    """The class of a canonical name or a module.Class path; a missing package is one line naming the extra."""
    if "." in name:
        return import_class(name, "optimizer_type")
    entry = OPTIMIZERS[name]
    check_optimizer_available(name)
    return import_class(f"{entry.module}.{entry.cls}", "optimizer_type")


def check_optimizer_available(name: str) -> None:
    """Refuse a table name whose package is not installed, naming what to install."""
    entry = OPTIMIZERS.get(name)
    if entry is None or not package_missing(entry.module):
        return
    package = entry.package or entry.module.partition(".")[0]
    how = f"pip install 'fluxpipe[{entry.extra}]' (or {package})" if entry.extra else f"pip install {package}"
    raise FluxpipeError(f"--optimizer_type {name}: needs the package {package}, which is not installed: {how}")


def is_schedule_free(name: str) -> bool:
    """The schedule-free optimizers run without an LR schedule (the reference swaps in a constant one)."""
    return name.lower().endswith("schedulefree")


# --network_module: the accepted names -> the implementation (fluxpipe.lora.network stands for networks.lora_flux)
NETWORK_MODULES = {
    "networks.lora_flux": "networks.lora_flux",
    "fluxpipe.lora.network": "networks.lora_flux",
    "lycoris.kohya": "lycoris.kohya",
}
NETWORK_PACKAGES = {"lycoris.kohya": ("lycoris", "lycoris-lora", "lycoris")}  # module -> (import, pip name, extra)

# --network_args keys of each network module (spec §10.6 for lora_flux; LyCORIS: lycoris.kohya.create_network)
NETWORK_ARGS: dict[str, frozenset[str]] = {
    "networks.lora_flux": frozenset(
        """train_blocks train_double_block_indices train_single_block_indices split_qkv train_t5xxl img_attn_dim
txt_attn_dim img_mlp_dim txt_mlp_dim img_mod_dim txt_mod_dim single_dim single_mod_dim in_dims network_reg_dims
network_reg_lrs rank_dropout module_dropout conv_dim conv_alpha loraplus_lr_ratio loraplus_unet_lr_ratio
loraplus_text_encoder_lr_ratio verbose""".split()
    ),
    "lycoris.kohya": frozenset(
        """algo preset conv_dim conv_alpha dropout rank_dropout module_dropout use_tucker use_scalar constraint
rescaled factor dora_wd wd_on_output train_norm bypass_mode full_matrix block_size
rs_lora unbalanced_factorization decompose_both""".split()
    ),
}


def check_network(module: str, args: list[str]) -> None:
    """Refuse an unknown --network_module, a missing package for it, and --network_args keys it does not take."""
    if module not in NETWORK_MODULES:
        raise FluxpipeError(
            f"--network_module: {module!r} is not supported: one of {', '.join(NETWORK_MODULES)} (OFT is not "
            "implemented)"
        )
    implementation = NETWORK_MODULES[module]
    if implementation in NETWORK_PACKAGES:
        top, package, extra = NETWORK_PACKAGES[implementation]
        if package_missing(top):
            raise FluxpipeError(
                f"--network_module {module}: needs the package {package}, which is not installed: "
                f"pip install 'fluxpipe[{extra}]' (or {package})"
            )
    known = NETWORK_ARGS[implementation]
    for arg in args:
        key, sep, _ = arg.partition("=")
        if not sep:
            raise FluxpipeError(f"--network_args {arg!r}: expected key=value")
        if key.strip() not in known:
            raise FluxpipeError(
                f"--network_args {arg}: {module} takes no key {key.strip()!r}; known keys: {', '.join(sorted(known))}"
            )
