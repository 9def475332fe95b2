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
from fluxpipe.errors import FluxpipeError


def _validate(args: argparse.Namespace) -> None:
    from fluxpipe.stages import validate

    cfg = validate.ValidateConfig(flux=args.flux, ae=args.ae, clip_l=args.clip_l, t5xxl=args.t5xxl,
                                  clip_tokenizer=args.clip_tokenizer, t5_tokenizer=args.t5_tokenizer,
                                  out=args.out, hash_cache=args.hash_cache)
    report = validate.run(cfg)
    print(f"ok: {', '.join(report['models'])} valid" + (f" (FLUX.1 {report['variant']})" if "variant" in report else ""))


def _demo_models(args: argparse.Namespace) -> None:
    from fluxpipe.stages import demo_models

    demo_models.run(demo_models.DemoModelsConfig(out=args.out, seed=args.seed))


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check model files strictly and write a JSON report",
                       description="Check FLUX.1 model files (keys, shapes, dtypes, variant) without loading them.")
    p.add_argument("--flux", type=Path, help="flux1-dev.safetensors or flux1-schnell.safetensors")
    p.add_argument("--ae", type=Path, help="ae.safetensors")
    p.add_argument("--clip-l", type=Path, help="clip_l.safetensors")
    p.add_argument("--t5xxl", type=Path, help="t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors")
    p.add_argument("--clip-tokenizer", type=Path, help="folder with the CLIP-L tokenizer (vocab.json, merges.txt)")
    p.add_argument("--t5-tokenizer", type=Path, help="folder with the T5 tokenizer (tokenizer.json)")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument("--hash-cache", type=Path, help="sha256 cache file (default ~/.cache/fluxpipe/sha256.json)")
    p.set_defaults(func=_validate)


def _add_demo_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-models", help="write tiny random FLUX.1 model files and tokenizers for the demo",
                       description="Write tiny random-initialised models in the official file layouts.")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo_models)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxpipe", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fluxpipe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    adders: list[Callable[[argparse._SubParsersAction], None]] = [_add_validate, _add_demo_models]
    for add in adders:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        args.func(args)
    except FluxpipeError as e:
        print(f"fluxpipe: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
