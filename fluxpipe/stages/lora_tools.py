"""`fluxpipe lora resize|merge|extract|convert|inspect`: tools for LoRA files (maths in ``fluxpipe.lora.tools``).

Inputs are LoRAs in any layout ``fluxpipe.lora.layouts`` reads and FLUX.1 DiT files; outputs are written atomically:
LoRAs in the kohya layout (``convert``: also diffusers/PEFT or ai-toolkit) with ``ss_network_dim/alpha`` updated and
the ``sshs_*`` hashes recomputed, a merged DiT in the layout and key set of its base file. Model-sized work streams:
one tensor of each DiT file at a time (safetensors ``safe_open``), the merged DiT written one tensor at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from fluxpipe.errors import CheckpointError, FluxpipeError

log = logging.getLogger(__name__)
PRECISIONS = {"float": "float32", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _dtype(name: str | None):  # noqa: ANN202
    import torch

    return None if name is None else getattr(torch, PRECISIONS[name])


def _pairs(path: Path) -> tuple[str, dict, dict[str, str]]:
    """(layout, kohya pairs, metadata) of a LoRA file."""
    from fluxpipe.inference.sampler import load_lora
    from fluxpipe.io.safetensors_file import read_header
    from fluxpipe.lora.files import parse_lora

    layout, kohya = load_lora(path)
    pairs = parse_lora(kohya)
    if any(not hasattr(p, "down") for p in pairs.values()):  # LyCORIS modules: deltas, no down/up pair
        raise FluxpipeError(f"{path}: a LyCORIS file (LoKr/LoHa/full); the lora tools read LoRA down/up pairs only")
    return layout, pairs, read_header(path).metadata


def _kohya_tensors(pairs: dict, dtype) -> dict:  # noqa: ANN001
    import torch

    out: dict[str, torch.Tensor] = {}
    for name, p in pairs.items():
        cast = dtype or p.down.dtype
        out |= {
            f"{name}.lora_down.weight": p.down.to(cast).contiguous(),
            f"{name}.lora_up.weight": p.up.to(cast).contiguous(),
            f"{name}.alpha": torch.tensor(p.alpha).to(cast),
        }
    return out


def save_lora_file(tensors: dict, path: Path, metadata: dict[str, str], dim: str, alpha: str) -> None:
    """Atomic write with ss_network_dim / ss_network_alpha set and the sshs_* hashes recomputed."""
    from fluxpipe.io.safetensors_file import save_safetensors
    from fluxpipe.lora.files import addnet_hashes

    meta = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    meta |= {"ss_network_dim": dim, "ss_network_alpha": alpha}
    meta.setdefault("ss_network_module", "networks.lora_flux")
    meta.setdefault("ss_base_model_version", "flux1")
    save_safetensors(tensors, path, {**meta, **addnet_hashes(tensors, meta)})


def dim_alpha(pairs: dict) -> tuple[str, str]:
    """ss_network_dim / ss_network_alpha of a set of pairs: the value when all share it, else "Dynamic"."""
    ranks, alphas = {p.rank for p in pairs.values()}, {p.alpha for p in pairs.values()}
    return (str(ranks.pop()) if len(ranks) == 1 else "Dynamic", str(alphas.pop()) if len(alphas) == 1 else "Dynamic")


def resize(args: argparse.Namespace) -> None:
    from fluxpipe.lora.tools import resize_pair

    _, pairs, meta = _pairs(args.model)
    top = max(p.rank for p in pairs.values())
    if args.new_rank > top:
        raise FluxpipeError(
            f"{args.model}: --new_rank {args.new_rank} is above the LoRA's rank {top}; give a lower one"
        )
    if args.new_conv_rank is not None:
        log.warning("--new_conv_rank ignored: FLUX LoRAs have no conv layers")
    if (args.dynamic_method is None) != (args.dynamic_param is None):
        raise FluxpipeError("--dynamic_method and --dynamic_param go together")
    new = {
        n: resize_pair(p, args.new_rank, args.dynamic_method, args.dynamic_param, args.device) for n, p in pairs.items()
    }
    ranks = [p.rank for p in new.values()]
    comment = f"dimension is resized from {top} to {args.new_rank}" + (
        f" ({args.dynamic_method} {args.dynamic_param})" if args.dynamic_method else ""
    )
    meta = {**meta, "ss_training_comment": "; ".join(filter(None, [meta.get("ss_training_comment"), comment]))}
    save_lora_file(_kohya_tensors(new, _dtype(args.save_precision)), args.save_to, meta, *dim_alpha(new))
    print(f"{args.save_to}: {len(new)} modules, rank {min(ranks)}-{max(ranks)} (was {top})")


def merge(args: argparse.Namespace) -> None:
    ratios = args.ratios or [1.0] * len(args.models)
    if len(ratios) != len(args.models):
        raise FluxpipeError(f"--ratios has {len(ratios)} values for {len(args.models)} --models")
    loras = [(_pairs(path)[1], r) for path, r in zip(args.models, ratios, strict=True)]
    if args.flux_model is not None:
        return merge_into_dit(args.flux_model, loras, args.save_to, _dtype(args.save_precision))
    from fluxpipe.lora.tools import concat_pairs

    merged = {}
    for name in dict.fromkeys(n for pairs, _ in loras for n in pairs):
        parts = [(pairs[name], r) for pairs, r in loras if name in pairs]
        if len({(p.up.shape[0], p.down.shape[1]) for p, _ in parts}) > 1:
            raise FluxpipeError(
                f"LoRA module {name} has different shapes in the --models: they were made for different base models"
            )
        merged[name] = concat_pairs(parts)
    meta = {
        "ss_training_comment": "merged from "
        + ", ".join(f"{p.name}:{r}" for p, r in zip(args.models, ratios, strict=True))
    }
    save_lora_file(_kohya_tensors(merged, _dtype(args.save_precision)), args.save_to, meta, *dim_alpha(merged))
    print(f"{args.save_to}: {len(merged)} modules, ranks concatenated")


def merge_into_dit(base: Path, loras: list, save_to: Path, dtype) -> None:  # noqa: ANN001
    """W + Σ ratio·delta for every LoRA module, one base tensor at a time; the output has the base file's keys."""
    import torch
    from safetensors import safe_open

    from fluxpipe.io.safetensors_file import DTYPES, read_header, save_safetensors_streaming

    header = read_header(base)
    if not any(".double_blocks." in f".{k}" for k in header.tensors):
        raise FluxpipeError(
            f"{base}: not a FLUX.1 DiT file (no double_blocks.* keys); --flux_model takes flux1-dev.safetensors"
        )
    targets = {
        "lora_unet_" + k.removeprefix("model.diffusion_model.")[: -len(".weight")].replace(".", "_"): k
        for k, t in header.tensors.items()
        if k.endswith(".weight") and len(t.shape) == 2
    }
    wanted: dict[str, list] = {}
    for pairs, ratio in loras:
        unknown = [n for n in pairs if n not in targets]
        if unknown:
            raise FluxpipeError(
                f"{len(unknown)} LoRA modules match no weight of {base} (text-encoder modules are not "
                f"merged into the DiT): {', '.join(sorted(unknown)[:5])}"
            )
        for name, pair in pairs.items():
            shape = header.tensors[targets[name]].shape
            if tuple(shape) != (pair.up.shape[0], pair.down.shape[1]):
                raise CheckpointError(
                    f"LoRA module {name} has shape {(pair.up.shape[0], pair.down.shape[1])}, the base "
                    f"weight {tuple(shape)}: the LoRA was made for another base model"
                )
            wanted.setdefault(targets[name], []).append((pair, ratio))
    placeholders = {
        k: torch.empty(t.shape, dtype=dtype or DTYPES[t.dtype], device="meta") for k, t in header.tensors.items()
    }
    keys = {id(t): k for k, t in placeholders.items()}
    with safe_open(str(base), framework="pt", device="cpu") as f:

        def fetch(t: torch.Tensor) -> torch.Tensor:
            key = keys[id(t)]
            w = f.get_tensor(key)
            for pair, ratio in wanted.get(key, []):
                w = w.float() + ratio * pair.delta()
            return w.to(t.dtype)

        save_safetensors_streaming(placeholders, save_to, header.metadata, fetch=fetch)
    print(f"{save_to}: {sum(len(v) for v in wanted.values())} LoRA modules merged into {base.name}")


def extract(args: argparse.Namespace) -> None:
    from safetensors import safe_open

    from fluxpipe.io.safetensors_file import read_header
    from fluxpipe.lora.tools import svd_lora

    org, tuned = read_header(args.model_org), read_header(args.model_tuned)
    if org.shapes() != tuned.shapes():
        diff = sorted(set(org.shapes().items()) ^ set(tuned.shapes().items()))
        raise FluxpipeError(
            f"{args.model_org} and {args.model_tuned} are not the same model (keys or shapes differ: "
            f"{', '.join(k for k, _ in diff[:5])}); extract needs a fine-tune and its own base"
        )
    keys = [
        k
        for k, t in org.tensors.items()
        if k.endswith(".weight") and len(t.shape) == 2 and ("double_blocks." in k or "single_blocks." in k)
    ]
    pairs = {}
    with (
        safe_open(str(args.model_org), framework="pt", device="cpu") as a,
        safe_open(str(args.model_tuned), framework="pt", device="cpu") as b,
    ):
        for k in keys:
            delta = b.get_tensor(k).to(args.device).float() - a.get_tensor(k).to(args.device).float()
            name = "lora_unet_" + k.removeprefix("model.diffusion_model.")[: -len(".weight")].replace(".", "_")
            pair = svd_lora(delta, args.dim, args.clamp_quantile)
            pairs[name] = type(pair)(down=pair.down.cpu(), up=pair.up.cpu(), alpha=pair.alpha)
    save_lora_file(
        _kohya_tensors(pairs, _dtype(args.save_precision)),
        args.save_to,
        {"ss_training_comment": f"extracted from {args.model_tuned.name} - {args.model_org.name}"},
        str(args.dim),
        str(float(args.dim)),
    )
    print(f"{args.save_to}: {len(pairs)} modules extracted at rank {args.dim}")


def convert(args: argparse.Namespace) -> None:
    from fluxpipe.io.safetensors_file import save_safetensors
    from fluxpipe.lora.tools import to_peft

    layout, pairs, meta = _pairs(args.src_path)
    if args.dst == "kohya":
        return save_lora_file(
            _kohya_tensors(pairs, _dtype(args.save_precision)), args.dst_path, meta, *dim_alpha(pairs)
        )
    try:
        tensors = to_peft(pairs, "transformer." if args.dst == "diffusers" else "diffusion_model.")
    except ValueError as e:
        raise FluxpipeError(f"{args.src_path}: {e}; it cannot be written as {args.dst}") from None
    cast = _dtype(args.save_precision)
    save_safetensors(
        {k: v.to(cast) if cast else v for k, v in tensors.items()},
        args.dst_path,
        {k: v for k, v in meta.items() if not k.startswith("sshs_")},
    )
    print(f"{args.dst_path}: {layout} -> {args.dst}, {len(pairs)} modules")


def inspect(args: argparse.Namespace) -> None:
    layout, pairs, meta = _pairs(args.model)
    modules = {n: {"rank": p.rank, "alpha": p.alpha, "norm": float(p.delta().norm())} for n, p in sorted(pairs.items())}
    norms = [m["norm"] for m in modules.values()]
    report = {
        "file": str(args.model),
        "layout": layout,
        "modules": len(pairs),
        "text_encoder_modules": sum(n.startswith(("lora_te1", "lora_te3")) for n in pairs),
        "ranks": sorted({p.rank for p in pairs.values()}),
        "alphas": sorted({p.alpha for p in pairs.values()}),
        "delta_norm": {"min": min(norms), "mean": sum(norms) / len(norms), "max": max(norms)},
        "metadata": {
            k: v
            for k, v in meta.items()
            if k.startswith(("ss_network", "ss_base", "ss_training_comment", "sshs_", "modelspec."))
        },
    }
    if args.verbose_modules:
        report["per_module"] = modules
    print(json.dumps(report, indent=1))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--save_precision", choices=tuple(PRECISIONS), help="dtype of the written tensors (default: as read)"
    )
    p.add_argument("--device", default="cpu", help="where the SVDs run (cpu, cuda)")


def add_lora_commands(sub: argparse._SubParsersAction) -> None:
    """`fluxpipe lora <tool>` parsers (flag names as the reference's networks/*.py scripts)."""
    lora = sub.add_parser("lora", help="LoRA tools: resize, merge, extract, convert, inspect")
    tools = lora.add_subparsers(dest="tool", required=True, metavar="<tool>")
    p = tools.add_parser("resize", help="SVD to a lower rank (fixed or dynamic), as resize_lora.py")
    p.add_argument("--model", type=Path, required=True, help="the LoRA to resize")
    p.add_argument("--save_to", type=Path, required=True)
    p.add_argument("--new_rank", type=int, default=4, help="the rank (with a dynamic method: the largest rank)")
    p.add_argument("--new_conv_rank", type=int, help="accepted; FLUX LoRAs have no conv layers")
    p.add_argument("--dynamic_method", choices=("sv_ratio", "sv_fro", "sv_cumulative"))
    p.add_argument("--dynamic_param", type=float, help="sv_ratio: S[0]/S limit; sv_fro, sv_cumulative: fraction kept")
    _common(p)
    p.set_defaults(func=resize)
    p = tools.add_parser("merge", help="LoRAs into one (ranks concatenated, exact) or into the DiT (--flux_model)")
    p.add_argument("--models", type=Path, nargs="+", required=True, help="LoRA files")
    p.add_argument("--ratios", type=float, nargs="+", help="one multiplier per LoRA (default 1)")
    p.add_argument("--flux_model", type=Path, help="merge into this DiT; the output has its layout and keys")
    p.add_argument("--save_to", type=Path, required=True)
    _common(p)
    p.set_defaults(func=merge)
    p = tools.add_parser("extract", help="a LoRA from a fine-tune minus its base (SVD), as flux_extract_lora.py")
    p.add_argument("--model_org", type=Path, required=True, help="the base DiT")
    p.add_argument("--model_tuned", type=Path, required=True, help="the fine-tuned DiT")
    p.add_argument("--save_to", type=Path, required=True)
    p.add_argument("--dim", type=int, default=4, help="rank")
    p.add_argument("--clamp_quantile", type=float, default=0.99, help="clamp entries at this quantile (1: none)")
    _common(p)
    p.set_defaults(func=extract)
    p = tools.add_parser("convert", help="between the kohya, diffusers/PEFT and ai-toolkit layouts")
    p.add_argument("--src_path", type=Path, required=True, help="a LoRA in any layout (detected)")
    p.add_argument("--dst_path", type=Path, required=True)
    p.add_argument("--dst", choices=("kohya", "diffusers", "ai-toolkit"), required=True)
    _common(p)
    p.set_defaults(func=convert)
    p = tools.add_parser("inspect", help="layout, ranks, alphas, modules, metadata and delta norms (JSON)")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--verbose_modules", action="store_true", help="also rank, alpha and norm per module")
    p.set_defaults(func=inspect)
