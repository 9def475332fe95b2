"""``fluxpipe <stage>``: parse flags, build the stage's typed config, call its ``run``.

Bad input (FluxpipeError) becomes one line on stderr ("fluxpipe: error: ...") and exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from fluxpipe import __version__
from fluxpipe.config import results
from fluxpipe.errors import FluxpipeError
from fluxpipe.parallel.devices import resolve_device
from fluxpipe.stages.lora_tools import add_lora_commands


def _validate(args: argparse.Namespace) -> None:
    from fluxpipe.stages import validate

    cfg = validate.ValidateConfig(
        flux=args.flux,
        ae=args.ae,
        clip_l=args.clip_l,
        t5xxl=args.t5xxl,
        clip_tokenizer=args.clip_tokenizer,
        t5_tokenizer=args.t5_tokenizer,
        out=args.out,
        hash_cache=args.hash_cache,
        model_type=args.model_type,
    )
    report = validate.run(cfg)
    variant, models = report.get("variant"), report["models"]
    assert isinstance(models, dict)  # slot -> facts (validate.run's report)
    what = "" if variant is None else " (Chroma)" if variant == "chroma" else f" (FLUX.1 {variant})"
    print(f"ok: {', '.join(models)} valid{what}")


def _demo_models(args: argparse.Namespace) -> None:
    from fluxpipe.tools import demo as demo_models

    demo_models.run(demo_models.DemoModelsConfig(out=args.out, seed=args.seed, trained=args.trained))


def _pipeline(args: argparse.Namespace):  # noqa: ANN202 - PipelineConfig
    """The pipeline config: --config-json (the settings a Snakemake rule passes), else the --config files."""
    from fluxpipe.config.pipeline import load_pipeline, load_pipeline_file

    if getattr(args, "config_json", None) is not None:
        import json

        try:
            data = json.loads(args.config_json)
        except json.JSONDecodeError as e:
            raise FluxpipeError(f"--config-json: not valid JSON ({e})") from e
        return load_pipeline(data)
    return load_pipeline_file(*(args.config or [Path("config/config.yaml")]))


def _add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument(
        "--config",
        type=Path,
        action="append",
        help="config.yaml (repeatable, later wins)" + ("" if required else "; default config/config.yaml"),
    )
    group.add_argument("--config-json", help="the settings as one JSON object (what the Snakemake rules pass)")


def _manifest(args: argparse.Namespace) -> None:
    from fluxpipe import workflow
    from fluxpipe.stages import manifest

    cfg = _pipeline(args)
    datasets = cfg.datasets()
    if datasets is None:
        raise FluxpipeError("no dataset configured: set dataset_config (a TOML file) or dataset in config.yaml")
    from fluxpipe.config.dataset import check_cacheable

    check_cacheable(datasets, cache_latents=True, cache_text=True)
    manifest.run(
        manifest.ManifestConfig(
            datasets=datasets,
            out=args.out,
            latent_shards=cfg.cache.latent_shards,
            text_shards=cfg.cache.text_shards,
            skip_bad_images=cfg.cache.skip_bad_images,
            hash_cache=cfg.hash_cache,
            workers=cfg.cache.decode_workers,
            masked_loss=workflow.masked_loss(cfg),
            caption_seed=workflow.caption_seed(cfg),
            caption_variants=cfg.cache.caption_variants,
        )
    )


def _cache_latents(args: argparse.Namespace) -> None:
    from fluxpipe import workflow
    from fluxpipe.stages import cache_latents

    cfg = _pipeline(args)
    c = cfg.cache
    cache_latents.run(
        cache_latents.CacheLatentsConfig(
            manifest=args.manifest,
            ae=Path(workflow.model_files(cfg)["ae"]),
            out=args.out,
            shard=args.shard,
            batch_size=c.vae_batch_size,
            dtype=c.latent_dtype,
            device=resolve_device(c.device),
            decode_workers=c.decode_workers,
            hash_cache=cfg.hash_cache,
            references=workflow.kontext(cfg),
        )
    )


def _cache_text(args: argparse.Namespace) -> None:
    from fluxpipe import workflow
    from fluxpipe.data.text_encoding import default_t5_max_length
    from fluxpipe.io.checkpoints import inspect_checkpoint
    from fluxpipe.stages import cache_text

    cfg = _pipeline(args)
    c = cfg.cache
    files, toks = workflow.model_files(cfg), workflow.tokenizer_dirs(cfg)
    variant = inspect_checkpoint(files["flux"], "flux").describe()["variant"]
    cache_text.run(
        cache_text.CacheTextConfig(
            manifest=args.manifest,
            clip_l=Path(files["clip_l"]),
            t5xxl=Path(files["t5xxl"]),
            clip_tokenizer=Path(toks["clip_tokenizer"]) if toks["clip_tokenizer"] else None,
            t5_tokenizer=Path(toks["t5_tokenizer"]) if toks["t5_tokenizer"] else None,
            out=args.out,
            shard=args.shard,
            max_length=c.t5xxl_max_token_length or default_t5_max_length(str(variant)),
            apply_t5_attn_mask=c.apply_t5_attn_mask,
            batch_size=c.text_encoder_batch_size,
            dtype=c.text_dtype,
            device=resolve_device(c.device),
            hash_cache=cfg.hash_cache,
            compile=c.compile_text_encoder,
        )
    )


def _cache_index(args: argparse.Namespace) -> None:
    from fluxpipe.stages import cache_index

    cache_index.run(
        cache_index.CacheIndexConfig(
            kind=args.kind, manifest=args.manifest, shards=tuple(args.shards), index=args.index, summary=args.summary
        )
    )


def _add_cache_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("manifest", help="scan the dataset into a Parquet manifest (hashes, captions, buckets)")
    _add_config(p)
    p.add_argument("--out", type=Path, required=True, help="manifest .parquet")
    p.set_defaults(func=_manifest)
    for name, func, what in (
        ("cache-latents", _cache_latents, "AE latents"),
        ("cache-text", _cache_text, "CLIP-L / T5-XXL outputs"),
    ):
        p = sub.add_parser(name, help=f"build one shard of the {what} cache")
        _add_config(p)
        p.add_argument("--manifest", type=Path, required=True)
        p.add_argument("--shard", type=int, required=True)
        p.add_argument("--out", type=Path, required=True, help="shard .safetensors")
        p.set_defaults(func=func)
    p = sub.add_parser("cache-index", help="gather cache shards into an index and a summary JSON")
    p.add_argument("--kind", choices=("latents", "text"), required=True)
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--index", type=Path, required=True, help="index .parquet")
    p.add_argument("--summary", type=Path, required=True, help="summary .json")
    p.add_argument("shards", type=Path, nargs="+")
    p.set_defaults(func=_cache_index)


def _bench(args: argparse.Namespace) -> None:
    import tempfile

    from fluxpipe.tools import bench

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        if args.workload == "caches":
            bench.bench_caches(
                Path(tmp), args.images, args.size, device, args.tiny, args.vae_batch, args.text_batch, args.workers
            )
        elif args.workload == "encoders":
            bench.bench_encoders(device)
        elif args.workload == "sample":
            for compiled in (False, True) if args.compile else (False,):
                bench.bench_sample(device, steps=28, compile_blocks=compiled)
        elif args.workload == "weights":
            bench.bench_weights(
                device,
                tuple(args.configs.split(",")) if args.configs != "ckpt,none" else ("full", "controlnet"),
                steps=args.steps,
            )
        elif args.workload == "train":
            bench.bench_train(device, tuple(args.configs.split(",")), steps=args.steps)
        else:
            bench.bench_dryrun(Path(tmp), args.images, Path(__file__).resolve().parents[1])


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks (one JSON line per measurement)",
        description="caches: manifest + latent + text stages on generated data; encoders: pure AE "
        "and T5-XXL throughput (GPU); dryrun: snakemake -n planning time",
    )
    p.add_argument("workload", choices=("caches", "encoders", "dryrun", "train", "sample", "weights"))
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (caches)")
    p.add_argument("--tiny", action="store_true", help="demo-size models instead of full-size ones (caches)")
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--text-batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=8, help="image decoding threads")
    p.add_argument(
        "--configs",
        default="ckpt,none",
        help="train: comma-separated configurations, e.g. ckpt,none,ckpt+compile,swap18,swap28,fp8+swap28",
    )
    p.add_argument("--steps", type=int, default=6, help="train: measured steps (after two warm-up steps)")
    p.add_argument("--compile", action="store_true", help="sample: also with compiled blocks")
    p.add_argument("--device", default="auto")
    p.add_argument("--workdir", type=Path, default=None, help="where temporary files go")
    p.set_defaults(func=_bench)


def _train(args: argparse.Namespace) -> None:
    from fluxpipe.commands import train as train_config
    from fluxpipe.config.reference_flags import parse_train_args

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--cache_dir", type=Path, help="use the pipeline's caches under this folder (results/)")
    extra.add_argument("--clip_tokenizer", type=Path)
    extra.add_argument("--t5_tokenizer", type=Path)
    extra.add_argument("--auto_resume", action="store_true", help="resume from the newest state in output_dir")
    extra.add_argument(
        "--stop_at_step",
        type=int,
        help="end this job at this optimizer step and write its state "
        "(<output_name>-segNNNNNNNN-state): one segment of a run chained as several jobs",
    )
    own, rest = extra.parse_known_args(args.flags)
    if own.stop_at_step is not None and own.stop_at_step < 1:
        raise FluxpipeError(f"--stop_at_step {own.stop_at_step}: give a positive optimizer step")
    ns = parse_train_args(rest, args.method)
    from fluxpipe.parallel.distributed import device_for, world

    w = world()  # under torchrun: this process's rank (DDP for LoRA and ControlNet, FSDP2 for the full fine-tune)
    device = device_for(w, resolve_device("auto"))
    train_config.check_supported(ns, device, args.method)  # before any work: a refused flag costs nothing
    _check_datasets(own, ns)
    from fluxpipe.io.output_dir import check_output_dir, output_lock

    check_output_dir(Path(ns.output_dir))  # (creates it: after every check of the settings)

    if not w.main:  # rank 0 holds the output folder's lock for all ranks
        _train_locked(args.method, own, ns, w, device)
        return
    with output_lock(Path(ns.output_dir), ns.output_name or "last"):
        _train_locked(args.method, own, ns, w, device)


def _check_datasets(own: argparse.Namespace, ns: argparse.Namespace) -> None:
    """The dataset settings, in every process, before the output folder is touched: a bad one costs nothing."""
    from fluxpipe.commands import train as train_config
    from fluxpipe.config.reference_flags import given_dataset_flags

    if own.cache_dir is None:
        train_config.check_kontext_pairs(ns, train_config.load_datasets(ns))
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


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a LoRA or the whole DiT with the reference trainer's flags",
        description="fluxpipe train lora <flags of flux_train_network.py> | train full <flags of "
        "flux_train.py> | train controlnet <flags of flux_train_control_net.py> "
        "[--cache_dir results] [--clip_tokenizer DIR --t5_tokenizer DIR] [--auto_resume] "
        "[--stop_at_step N: end the job at step N with its state, one segment of a chained "
        "run]. Under torchrun: data parallel (DDP; FSDP2 for full).",
    )
    p.add_argument("method", choices=("lora", "full", "controlnet"))
    p.add_argument("flags", nargs=argparse.REMAINDER, help="the reference's flags (see --help of the method)")
    p.set_defaults(func=_train)


def _pipeline_models(args: argparse.Namespace):  # noqa: ANN202 - (PipelineConfig, ModelFiles, variant)
    """The pipeline config, its model files (the demo's when none is set) and the DiT's variant."""
    from fluxpipe.inference.sampler import ModelFiles
    from fluxpipe.io.checkpoints import inspect_checkpoint
    from fluxpipe.workflow import model_files, tokenizer_dirs

    cfg = _pipeline(args)
    files, toks = model_files(cfg), tokenizer_dirs(cfg)
    if cfg.models.demo and not Path(files["flux"]).is_file():
        raise FluxpipeError(
            f"{files['flux']}: the demo models are not there yet; run `snakemake --cores 1 "
            "demo_models` (or set the model files in the config)"
        )
    models = ModelFiles(
        **{k: Path(v) for k, v in files.items()},
        **{k: Path(v) if v else None for k, v in toks.items()},  # type: ignore[arg-type] # (tokenizer folders)
    )
    return cfg, models, inspect_checkpoint(models.flux, "flux").describe()["variant"]


def _compute_dtype(device: str):  # noqa: ANN202
    import torch

    return torch.float32 if device == "cpu" else torch.bfloat16


def _sample(args: argparse.Namespace) -> None:
    from fluxpipe.data.prompts import SamplePrompt, load_prompts
    from fluxpipe.data.text_encoding import default_t5_max_length
    from fluxpipe.inference.sampler import default_steps
    from fluxpipe.stages import sample

    _, models, variant = _pipeline_models(args)
    if (args.prompt is None) == (args.prompts_file is None):
        raise FluxpipeError("give either --prompt TEXT or --prompts-file FILE")
    if args.prompt is not None:
        prompts = [
            SamplePrompt(
                index=0,
                prompt=args.prompt,
                negative_prompt=args.negative or "",
                width=args.width,
                height=args.height,
                seed=args.seed,
                steps=args.steps or default_steps(variant),
                guidance=args.guidance,
                cfg_scale=args.cfg_scale,
                control_image=args.control_image,
                reference_image=args.reference_image,
            )
        ]
    else:
        prompts = load_prompts(args.prompts_file)
    device = resolve_device(args.device)
    sample.run(
        sample.SampleConfig(
            models=models,
            prompts=tuple(prompts),
            out=args.out,
            seed=args.seed,
            loras=tuple(sample.parse_lora_arg(v) for v in args.lora),
            merge=not args.unmerged,
            device=device,
            dtype=_compute_dtype(device),
            t5_max_length=args.t5xxl_max_token_length or default_t5_max_length(variant),
            apply_t5_attn_mask=args.apply_t5_attn_mask,
            blocks_to_swap=args.blocks_to_swap,
            compile_blocks=args.compile,
            controlnet=args.controlnet,
            reference_size=args.reference_size,
        )
    )


def _evaluate(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from fluxpipe.data.prompts import SamplePrompt, load_prompts
    from fluxpipe.data.text_encoding import default_t5_max_length
    from fluxpipe.inference.sampler import default_steps
    from fluxpipe.stages import evaluate

    cfg, models, variant = _pipeline_models(args)
    ev = cfg.evaluate
    if ev.prompts_file:
        prompts = load_prompts(Path(ev.prompts_file))
    else:
        prompts = [
            SamplePrompt(
                index=i,
                prompt=text,
                width=ev.width,
                height=ev.height,
                steps=ev.steps or default_steps(variant),
                guidance=ev.guidance,
            )
            for i, text in enumerate(ev.prompts)
        ]
    if ev.reference_image:  # Kontext: one reference image for every prompt
        prompts = [replace(p, reference_image=Path(ev.reference_image)) for p in prompts]
    device = resolve_device(ev.device)
    name = args.name or (cfg.train or {}).get("output_name") or "last"
    evaluate.run(
        evaluate.EvaluateConfig(
            models=models,
            train_dir=args.train_dir,
            output_name=name,
            prompts=tuple(prompts),
            seeds=ev.seeds,
            out=args.out,
            lora_multiplier=ev.lora_multiplier,
            device=device,
            dtype=_compute_dtype(device),
            t5_max_length=cfg.cache.t5xxl_max_token_length or default_t5_max_length(variant),
            apply_t5_attn_mask=cfg.cache.apply_t5_attn_mask,
            blocks_to_swap=ev.blocks_to_swap,
            controlnet=Path(ev.controlnet) if ev.controlnet else None,
            reference_size=ev.reference_size,
            manifest=args.manifest,
        )
    )


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="sample grids of every saved LoRA of a run, loss plots, metrics.json",
        description="Prompts, seeds and sizes come from the config's evaluate: section.",
    )
    _add_config(p, required=False)
    p.add_argument("--train-dir", type=Path, default=Path(results.TRAIN_DIRS["lora"]))
    p.add_argument("--name", help="the run's output_name (default: train.output_name of the config)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--manifest",
        type=Path,
        default=Path(results.MANIFEST),
        help="dataset manifest whose training images the sample distance uses (skipped if absent)",
    )
    p.set_defaults(func=_evaluate)


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="generate images with the official FLUX.1 sampler (LoRAs optional)",
        description="Model files come from the pipeline config (empty: the demo models).",
    )
    p.add_argument("--prompt", help="the prompt (or --prompts-file)")
    p.add_argument("--prompts-file", type=Path, help="prompts in the reference's .txt / .toml / .json format")
    p.add_argument("--negative", help="negative prompt (true CFG; used when --cfg-scale is not 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--steps", type=int, help="default: 50 for dev, 4 for schnell")
    p.add_argument("--guidance", type=float, default=3.5, help="embedded guidance (dev)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="true CFG scale with --negative")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:MULT]", help="repeatable")
    p.add_argument("--unmerged", action="store_true", help="attach LoRAs as branches instead of merging them")
    p.add_argument("--blocks-to-swap", type=int, default=0)
    p.add_argument("--t5xxl-max-token-length", type=int, help="default: 512 dev, 256 schnell")
    p.add_argument("--apply-t5-attn-mask", action="store_true")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the DiT blocks (GPU; pays off from a few images)"
    )
    p.add_argument(
        "--controlnet", type=Path, help="a ControlNet-Flux file (for --control-image or --cn in a prompt file)"
    )
    p.add_argument("--control-image", type=Path, help="control image of --prompt (needs --controlnet)")
    _add_config(p, required=False)
    p.add_argument(
        "--reference-image",
        type=Path,
        help="FLUX.1 Kontext: the reference image of --prompt (a Kontext "
        "model and LoRA; its tokens join the sequence with ids (1, row, col))",
    )
    p.add_argument(
        "--reference-size",
        choices=("kontext", "target"),
        default="kontext",
        help="resize the reference to the nearest Kontext resolution (official) or to --width x --height",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, required=True, help="PNG file (one prompt) or folder (a prompt file)")
    p.set_defaults(func=_sample)


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="check model files strictly and write a JSON report",
        description="Check FLUX.1 model files (keys, shapes, dtypes, variant) without loading them.",
    )
    p.add_argument("--flux", type=Path, help="flux1-dev.safetensors or flux1-schnell.safetensors (or a Chroma file)")
    p.add_argument(
        "--model-type", choices=("flux", "chroma"), default="flux", help="chroma: --flux is a Chroma DiT (no CLIP-L)"
    )
    p.add_argument("--ae", type=Path, help="ae.safetensors")
    p.add_argument("--clip-l", type=Path, help="clip_l.safetensors")
    p.add_argument("--t5xxl", type=Path, help="t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors")
    p.add_argument("--clip-tokenizer", type=Path, help="folder with the CLIP-L tokenizer (vocab.json, merges.txt)")
    p.add_argument("--t5-tokenizer", type=Path, help="folder with the T5 tokenizer (tokenizer.json)")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument("--hash-cache", type=Path, help="sha256 cache file (default ~/.cache/fluxpipe/sha256.json)")
    p.set_defaults(func=_validate)


def _add_demo_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo-models",
        help="write tiny random FLUX.1 model files and tokenizers for the demo",
        description="Write tiny random-initialised models in the official file layouts.",
    )
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--trained",
        action="store_true",
        help="the DiT and AE trained on a world of coloured shapes "
        "(64 px, prompts like 'a red circle on a blue background'; seed 0 only)",
    )
    p.set_defaults(func=_demo_models)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxpipe", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fluxpipe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    adders: list[Callable[[argparse._SubParsersAction], None]] = [
        _add_validate,
        _add_demo_models,
        _add_cache_commands,
        _add_bench,
        _add_train,
        _add_sample,
        _add_evaluate,
        add_lora_commands,
    ]
    for add in adders:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        args.func(args)
    except FluxpipeError as e:
        print(f"fluxpipe: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
