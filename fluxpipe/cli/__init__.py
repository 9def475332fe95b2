"""``fluxpipe <stage>``: parse flags, build the stage's typed config, call its ``run``.

One module per command group (cache, models, sample, train); ``python -m fluxpipe.cli`` runs it too (torchrun).
Bad input (FluxpipeError) becomes one line on stderr ("fluxpipe: error: ...") and exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from fluxpipe import __version__
from fluxpipe.cli.cache import add_cache_commands
from fluxpipe.cli.common import accept_both_spellings, quiet_library_noise, use_job_threads
from fluxpipe.cli.models import add_bench, add_demo_models, add_validate
from fluxpipe.cli.report import add_parser as add_run_report
from fluxpipe.cli.sample import add_evaluate, add_sample
from fluxpipe.cli.train import add_train
from fluxpipe.errors import FluxpipeError
from fluxpipe.stages.lora_tools import add_lora_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fluxpipe",
        description="FLUX.1 training, stage by stage (the Snakemake rules run these commands); "
        "`fluxpipe <stage> --help` tells each stage's flags.",
    )
    parser.add_argument("--version", action="version", version=f"fluxpipe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    adders: list[Callable[[argparse._SubParsersAction], None]] = [
        add_validate,
        add_demo_models,
        add_cache_commands,
        add_bench,
        add_train,
        add_sample,
        add_evaluate,
        add_lora_commands,
        add_run_report,
    ]
    for add in adders:
        add(sub)
    for name, command in sub.choices.items():
        if name != "train":  # (train parses the reference's own flags, which are spelled as the reference does)
            accept_both_spellings(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    quiet_library_noise()
    use_job_threads(args.command)
    try:
        args.func(args)
    except FluxpipeError as e:
        print(f"fluxpipe: error: {e}", file=sys.stderr)
        return 2
    return 0
