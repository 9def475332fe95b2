"""`fluxpipe train lora | full | controlnet`: the reference trainer's flags plus fluxpipe's own."""

from __future__ import annotations

import argparse
from pathlib import Path

from fluxpipe.errors import FluxpipeError
from fluxpipe.parallel.devices import resolve_device


def _train(args: argparse.Namespace) -> None:
    from fluxpipe.commands import train as train_config
    from fluxpipe.config.reference_flags import parse_train_args

    from fluxpipe.cli.common import accept_both_spellings
    from fluxpipe.cli.train_help import add_own_flags, print_method_help

    if {"-h", "--help", "--help-all", "--help_all"} & set(args.flags):  # the method's own help
        print_method_help(args.method, show_all=bool({"--help-all", "--help_all"} & set(args.flags)))
        return
    extra = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_own_flags(extra)
    accept_both_spellings(extra)
    own, rest = extra.parse_known_args(args.flags)
    if own.stop_at_step is not None and own.stop_at_step < 1:
        raise FluxpipeError(f"--stop_at_step {own.stop_at_step}: give a positive optimizer step")
    ns = parse_train_args(rest, args.method)
    from fluxpipe.parallel.distributed import device_for, world

    w = world()  # under torchrun: this process's rank (DDP for LoRA and ControlNet, FSDP2 for the full fine-tune)
    device = device_for(w, resolve_device("auto"))
    train_config.check_supported(ns, device, args.method)  # before any work: a refused flag costs nothing
    _check_datasets(args.method, own, ns)
    from fluxpipe.io.output_dir import check_output_dir, output_lock

    check_output_dir(Path(ns.output_dir))  # (creates it: after every check of the settings)

    if not w.main:  # rank 0 holds the output folder's lock for all ranks
        _train_locked(args.method, own, ns, w, device)
        return
    with output_lock(Path(ns.output_dir), ns.output_name or "last"):
        _train_locked(args.method, own, ns, w, device)


def _check_datasets(method: str, own: argparse.Namespace, ns: argparse.Namespace) -> None:
    """The dataset settings, in every process, before the output folder is touched: a bad one costs nothing."""
    from fluxpipe.commands import train as train_config
    from fluxpipe.config.reference_flags import given_dataset_flags

    datasets = train_config.load_datasets(ns) if own.cache_dir is None or method == "controlnet" else None
    if datasets is not None:
        train_config.check_controlnet_crops(method, ns, datasets)
    if own.cache_dir is None:
        train_config.check_kontext_pairs(ns, datasets)
        return
    if given_dataset_flags(ns):
        raise FluxpipeError(
            f"{', '.join(given_dataset_flags(ns))}: the pipeline's caches are built from its "
            "dataset config; set these there (e.g. batch_size for --train_batch_size)"
        )
    if ns.validation_split or ns.validation_seed is not None:
        raise FluxpipeError(
            "--validation_split / --validation_seed: the pipeline's caches are built from the "
            "dataset TOML; set validation_split (and validation_seed) there"
        )


def _train_locked(method: str, own: argparse.Namespace, ns: argparse.Namespace, w, device: str) -> None:  # noqa: ANN001
    """Caches (unless --cache_dir) and the training of ``method``, with the output folder locked."""
    from dataclasses import replace

    from fluxpipe.commands import train as train_config
    from fluxpipe.stages import train_lora

    if own.cache_dir is not None:
        train_config.check_pipeline_dataset(ns)
        caches = train_config.pipeline_caches(own.cache_dir)
    else:
        work = Path(ns.output_dir) / ".fluxpipe-cache"
        if w.main:  # rank 0 encodes; the others use its caches
            train_config.build_caches(ns, work, device, own.clip_tokenizer, own.t5_tokenizer)
        w.barrier()
        caches = train_config.pipeline_caches(work)
    segment = {"stop_at_step": own.stop_at_step}
    if method == "full":
        from fluxpipe.stages import train_full

        train_full.train(
            replace(
                train_config.full_config(ns, caches, device, own.auto_resume, own.clip_tokenizer, own.t5_tokenizer),
                **segment,
            )
        )
        return
    if method == "controlnet":
        from fluxpipe.stages import train_controlnet

        train_controlnet.train(
            replace(
                train_config.controlnet_config(
                    ns, caches, device, own.auto_resume, own.clip_tokenizer, own.t5_tokenizer
                ),
                **segment,
            )
        )
        return
    train_lora.train(
        replace(
            train_config.lora_config(ns, caches, device, own.auto_resume, own.clip_tokenizer, own.t5_tokenizer),
            **segment,
        )
    )


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a LoRA or the whole DiT with the reference trainer's flags",
        description="fluxpipe train lora <flags of flux_train_network.py> | train full <flags of "
        "flux_train.py> | train controlnet <flags of flux_train_control_net.py>, plus fluxpipe's own "
        "[--cache_dir results] [--clip_tokenizer DIR --t5_tokenizer DIR] [--auto_resume] "
        "[--stop_at_step N: end the job at step N with its state, one segment of a chained "
        "run]. `fluxpipe train <method> --help` lists a method's flags. Under torchrun: data parallel "
        "(DDP; FSDP2 for full).",
    )
    p.add_argument("method", choices=("lora", "full", "controlnet"))
    p.add_argument(
        "flags",
        nargs=argparse.REMAINDER,
        help="the reference's flags and fluxpipe's own (fluxpipe train METHOD --help)",
    )
    p.set_defaults(func=_train)
