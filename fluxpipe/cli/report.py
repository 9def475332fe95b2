"""``fluxpipe run-report METHOD [--out DIR ...] <the run's training flags>``: the run report of one training run
(rules run_report_lora / _full / _controlnet). The training flags are the ones ``fluxpipe train METHOD`` got;
they are parsed as the trainer parses them, so the settings shown are the run's own, defaults resolved."""

from __future__ import annotations

import argparse
from pathlib import Path

from fluxpipe.config import results

OWN_TRAIN_FLAGS = ("--cache_dir", "--clip_tokenizer", "--t5_tokenizer", "--stop_at_step")  # fluxpipe's, with a value


def _own_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fluxpipe run-report", add_help=False, allow_abbrev=False)
    p.add_argument("--out", type=Path)
    p.add_argument("--manifest", type=Path)
    p.add_argument("--validate-report", type=Path)
    p.add_argument("--metrics", type=Path)
    p.add_argument("--hash-cache", type=Path)
    for flag in OWN_TRAIN_FLAGS:  # fluxpipe train's own flags: not the reference's, not shown
        p.add_argument(flag)
    p.add_argument("--auto_resume", action="store_true")
    return p


def _join(values: object) -> str:
    return " ".join(str(v) for v in values) if isinstance(values, list | tuple) else str(values)


def memory_mode(ns: argparse.Namespace) -> str:
    """The memory-saving settings in effect, in words ("none" when none is)."""
    parts = []
    if ns.gradient_checkpointing:
        parts.append("gradient checkpointing" + (" (CPU offload)" if ns.cpu_offload_checkpointing else ""))
    swap = [(n, getattr(ns, f)) for n, f in (("", "blocks_to_swap"), ("double ", "double_blocks_to_swap"))]
    swap.append(("single ", getattr(ns, "single_blocks_to_swap", None)))
    parts += [f"{n}blocks_to_swap {v}" for n, v in swap if v]
    parts += [name for name, on in (("fp8 base", ns.fp8_base), ("fp8 base (DiT)", ns.fp8_base_unet)) if on]
    parts += [name for name, on in (("full_bf16", ns.full_bf16), ("full_fp16", getattr(ns, "full_fp16", False))) if on]
    if ns.fused_backward_pass:
        parts.append("fused backward pass")
    if getattr(ns, "blockwise_fused_optimizers", False):
        parts.append("blockwise fused optimizers")
    return ", ".join(parts) or "none"


def _scheduler(ns: argparse.Namespace) -> str:
    text = ns.lr_scheduler
    if ns.lr_warmup_steps:
        text += f", warmup {ns.lr_warmup_steps}"
    if ns.lr_scheduler in ("cosine_with_restarts", "polynomial"):
        text += f", cycles {ns.lr_scheduler_num_cycles}, power {ns.lr_scheduler_power}"
    return text


def settings_rows(ns: argparse.Namespace, method: str) -> list[tuple[str, str]]:
    """(name, value) of the run's settings in the report's order."""
    from fluxpipe.commands.train import load_datasets

    rows: list[tuple[str, str]] = []
    if method == "lora":
        from fluxpipe.commands.train import lora_spec

        spec = lora_spec(ns)
        rows += [
            ("network module", ns.network_module or "networks.lora_flux"),
            ("rank (network_dim)", str(spec.network_dim)),
            ("alpha (network_alpha)", str(spec.network_alpha or spec.network_dim)),
        ]
        if ns.network_args:
            rows.append(("network_args", _join(ns.network_args)))
        rows.append(("text encoder trained", "no" if ns.network_train_unet_only else "CLIP-L LoRA"))
    lrs = [("unet_lr", ns.unet_lr), ("text_encoder_lr", ns.text_encoder_lr)]
    rows.append(("learning rate", " ".join([str(ns.learning_rate), *(f"({k} {v})" for k, v in lrs if v)])))
    rows.append(("optimizer", " ".join([ns.optimizer_type, *(ns.optimizer_args or [])])))
    rows.append(("scheduler", _scheduler(ns)))
    rows.append(
        (
            "max_train_epochs" if ns.max_train_epochs else "max_train_steps",
            str(ns.max_train_epochs or ns.max_train_steps),
        )
    )
    datasets = load_datasets(ns).datasets
    rows.append(("resolution", "; ".join("×".join(map(str, ds.resolution)) for ds in datasets)))
    rows.append(("batch size per device", "; ".join(str(ds.batch_size) for ds in datasets)))
    rows.append(("gradient accumulation steps", str(ns.gradient_accumulation_steps)))
    rows.append(("memory mode", memory_mode(ns)))
    rows.append(("mixed precision", ns.mixed_precision))
    rows.append(("seed", str(ns.seed)))
    rows.append(("timestep sampling", f"{ns.timestep_sampling} (discrete_flow_shift {ns.discrete_flow_shift})"))
    rows.append(("model prediction", ns.model_prediction_type))
    rows.append(("guidance scale", str(ns.guidance_scale)))
    rows.append(("dataset config", str(ns.dataset_config)))
    return rows


def _model_files(ns: argparse.Namespace, method: str) -> tuple[tuple[str, Path], ...]:
    dit = "chroma" if ns.model_type == "chroma" else "flux"
    files = [(dit, ns.pretrained_model_name_or_path), ("ae", ns.ae), ("clip_l", ns.clip_l), ("t5xxl", ns.t5xxl)]
    if method == "controlnet" and ns.controlnet_model_name_or_path:
        files.append(("controlnet (start)", ns.controlnet_model_name_or_path))
    return tuple((slot, Path(p)) for slot, p in files if p)


def _run_report(args: argparse.Namespace) -> None:
    from fluxpipe.config.reference_flags import parse_train_args
    from fluxpipe.stages import run_report

    own, rest = _own_parser().parse_known_args(args.flags)
    ns = parse_train_args(rest, args.method)
    name = ns.output_name or "last"
    run_report.run(
        run_report.RunReportConfig(
            method=args.method,
            train_dir=Path(ns.output_dir),
            output_name=name,
            out=own.out or Path(results.RESULTS) / "report" / args.method,
            settings=tuple(settings_rows(ns, args.method)),
            model_files=_model_files(ns, args.method),
            manifest=own.manifest,
            validate_report=own.validate_report,
            metrics=own.metrics,
            hash_cache=own.hash_cache,
        )
    )
    print(f"ok: run report of {name} in {own.out or Path(results.RESULTS) / 'report' / args.method}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run-report",
        help="the report of one training run: settings, timings, curves, dataset preview (HTML + PNGs)",
        description="fluxpipe run-report lora|full|controlnet [--out DIR] [--manifest PARQUET] "
        "[--validate-report JSON] [--metrics evaluate's metrics.json] [--hash-cache FILE] <the flags the run's "
        "`fluxpipe train` got> (default --out: results/report/METHOD).",
    )
    p.add_argument("method", choices=("lora", "full", "controlnet"))
    p.add_argument("flags", nargs=argparse.REMAINDER, help="--out etc., then the run's training flags")
    p.set_defaults(func=_run_report)
