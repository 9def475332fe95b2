"""`fluxpipe train <method> --help`: the method's own flags, fluxpipe's additions, the real defaults.

The reference parser holds every flag of the reference's LoRA script; the help of a method shows the flags that
method acts on (or accepts and ignores, or rejects with a reason), hides the ones it does not act on yet and
names those in one closing paragraph. The parsing itself stays the reference parser's (``parse_train_args``).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

METHODS = {
    "lora": ("a FLUX.1 LoRA", "flux_train_network.py", "LoRA trainer"),
    "full": ("the whole FLUX.1 DiT (full fine-tune; FSDP2 under torchrun)", "flux_train.py", "full fine-tune"),
    "controlnet": ("a ControlNet for FLUX.1", "flux_train_control_net.py", "ControlNet trainer"),
}

# fluxpipe's own flags of `fluxpipe train` (not the reference's): (flag, argparse keywords)
OWN_FLAGS: tuple[tuple[str, dict], ...] = (
    (
        "--cache_dir",
        {
            "type": Path,
            "help": "use the Snakemake pipeline's caches under this folder (results/) instead of "
            "encoding the dataset into <output_dir>/.fluxpipe-cache",
        },
    ),
    ("--clip_tokenizer", {"type": Path, "help": "local folder of the CLIP-L tokenizer (vocab.json, merges.txt)"}),
    ("--t5_tokenizer", {"type": Path, "help": "local folder of the T5 tokenizer (tokenizer.json)"}),
    ("--auto_resume", {"action": "store_true", "help": "resume from the newest state in --output_dir"}),
    (
        "--stop_at_step",
        {
            "type": int,
            "help": "end this job at this optimizer step and write its state "
            "(<output_name>-segNNNNNNNN-state): one segment of a run chained as several jobs",
        },
    ),
)

# defaults that fluxpipe resolves after parsing (the parser's own default is None or empty)
REAL_DEFAULTS = {
    "seed": (42, "fluxpipe's default; the reference draws a random seed"),
    "optimizer_type": ("AdamW", None),
    "output_name": ("last", None),
}
LORA_DEFAULTS = {"network_dim": (4, None), "network_module": ("networks.lora_flux", None)}

_SPEC = re.compile(r"\s*\(spec §[^)]*\)|\s*spec §[\d.,§\s-]*")


def add_own_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    for flag, kwargs in OWN_FLAGS:
        parser.add_argument(flag, **kwargs)


def _honoured(method: str) -> set[str]:
    from fluxpipe.commands.train_flags import HONOURED, HONOURED_CONTROLNET, HONOURED_FULL, SPECIAL
    from fluxpipe.config.reference_flags import REJECTED, ignored_for

    honoured = {"lora": HONOURED, "full": HONOURED_FULL, "controlnet": HONOURED_CONTROLNET}[method]
    ignored = {f.lstrip("-") for f in ignored_for(method)}
    special = SPECIAL if method == "lora" else set()
    return set(honoured) | ignored | set(REJECTED) | set(special) | {"config_file", "help"}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag; the description and the closing lines as written."""


IGNORED_NOTE = "ignored for FLUX (accepted with a warning)"  # (reference_flags' note)
NOT_YET = "not acted on by this method yet: refused unless left at its default"


def method_parser(method: str, show_all: bool = False) -> tuple[argparse.ArgumentParser, list[str]]:
    """The help parser of ``method`` and the reference flags it does not act on yet: hidden, or with
    ``show_all`` (--help-all) shown and marked as such."""
    from fluxpipe.config.reference_flags import build_parser

    what, script, _ = METHODS[method]
    parser = build_parser(prog=f"fluxpipe train {method}")
    parser.formatter_class = _Formatter
    parser.usage = f"%(prog)s [--config_file X.toml] [flags of sd-scripts {script}] [fluxpipe's own flags]"
    parser.description = f"Train {what} with the flags of sd-scripts {script}."
    from fluxpipe.config.reference_flags import IGNORED_FOR_FLUX, ignored_for

    keep, hidden = _honoured(method), []
    acted_on = set(IGNORED_FOR_FLUX) - set(ignored_for(method))
    defaults = {**REAL_DEFAULTS, **(LORA_DEFAULTS if method == "lora" else {})}
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        if action.dest not in keep:
            hidden.append(action.option_strings[0])
            action.help = NOT_YET if show_all else argparse.SUPPRESS
            continue
        if action.dest in defaults:
            action.default, note = defaults[action.dest]
            action.help = note or "(default: %(default)s)"  # (the formatter appends it to a note)
        if action.help and action.help is not argparse.SUPPRESS:
            action.help = _SPEC.sub("", action.help)
            if action.option_strings[0] in acted_on:  # ignored by the LoRA trainer, used by this method
                action.help = action.help.replace(IGNORED_NOTE, "").strip("; ") or "(default: %(default)s)"
    for group in parser._action_groups:
        group.title = _SPEC.sub("", group.title or "") or None  # (a group whose flags are all hidden: no heading)
    own = parser.add_argument_group("fluxpipe's own flags")
    add_own_flags(own)
    own.add_argument("--help-all", action="store_true", help="this help with every flag of the reference's parser")
    if hidden and not show_all:
        parser.epilog = (
            f"{len(hidden)} flags of the reference that fluxpipe's {METHODS[method][2]} does not act on yet are\n"
            f"hidden (refused unless left at their defaults); this lists them: fluxpipe train {method} --help-all"
        )
    return parser, sorted(hidden)


def print_method_help(method: str, show_all: bool = False) -> None:
    method_parser(method, show_all)[0].print_help()
