"""`fluxpipe validate | demo-models | bench`: model files and benchmarks."""

from __future__ import annotations

import argparse
from pathlib import Path

from fluxpipe.parallel.devices import resolve_device


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

    if args.chroma:
        print(f"chroma: {demo_models.write_chroma_demo(args.out, seed=args.seed)}")
        return
    demo_models.run(demo_models.DemoModelsConfig(out=args.out, seed=args.seed, trained=args.trained))


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
            bench.bench_dryrun(Path(tmp), args.images, Path(__file__).resolve().parents[2])


def add_bench(sub: argparse._SubParsersAction) -> None:
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


def add_validate(sub: argparse._SubParsersAction) -> None:
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


def add_demo_models(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument(
        "--chroma",
        action="store_true",
        help="write only the tiny random Chroma DiT (chroma-tiny.safetensors), which pairs with the AE, T5 and "
        "tokenizers written without --chroma",
    )
    p.set_defaults(func=_demo_models)
