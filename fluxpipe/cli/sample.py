"""`fluxpipe sample | evaluate`: images with the official sampler, and the evaluation of a run."""

from __future__ import annotations

import argparse
from pathlib import Path

from fluxpipe.cli.common import add_config, compute_dtype, pipeline_models
from fluxpipe.config import results
from fluxpipe.errors import FluxpipeError
from fluxpipe.parallel.devices import resolve_device


def _sample(args: argparse.Namespace) -> None:
    from fluxpipe.data.prompts import SamplePrompt, load_prompts
    from fluxpipe.data.text_encoding import default_t5_max_length
    from fluxpipe.inference.sampler import default_steps
    from fluxpipe.stages import sample

    cfg, models, variant = pipeline_models(args)
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
            dtype=compute_dtype(device),
            t5_max_length=args.t5xxl_max_token_length or default_t5_max_length(variant),
            apply_t5_attn_mask=args.apply_t5_attn_mask or cfg.chroma,  # (Chroma always encodes with the mask)
            blocks_to_swap=args.blocks_to_swap,
            compile_blocks=args.compile,
            controlnet=args.controlnet,
            reference_size=args.reference_size,
            model_type="chroma" if cfg.chroma else "flux",
        )
    )


def _evaluate(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from fluxpipe.data.prompts import SamplePrompt, load_prompts
    from fluxpipe.data.text_encoding import default_t5_max_length
    from fluxpipe.inference.sampler import default_steps
    from fluxpipe.stages import evaluate

    cfg, models, variant = pipeline_models(args)
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
            dtype=compute_dtype(device),
            t5_max_length=cfg.cache.t5xxl_max_token_length or default_t5_max_length(variant),
            apply_t5_attn_mask=cfg.cache.apply_t5_attn_mask,
            blocks_to_swap=ev.blocks_to_swap,
            controlnet=Path(ev.controlnet) if ev.controlnet else None,
            reference_size=ev.reference_size,
            model_type="chroma" if cfg.chroma else "flux",
            manifest=args.manifest,
        )
    )


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="sample grids of every saved LoRA of a run, loss plots, metrics.json",
        description="Prompts, seeds and sizes come from the config's evaluate: section.",
    )
    add_config(p, required=False)
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


def add_sample(sub: argparse._SubParsersAction) -> None:
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
    add_config(p, required=False)
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
