"""Sample stage (`fluxpipe sample`): images from prompts with the official sampler, optionally with LoRAs.

Input: the model files of the pipeline config (or the demo models), a prompt (or a prompt file in the reference's
.txt / .toml / .json formats), LoRA files with multipliers. Output: one PNG per prompt (and seed), written
atomically; with a single prompt, exactly the ``--out`` file. A prompt's ``--d`` seed wins over ``--seed``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxpipe.data.prompts import SamplePrompt
from fluxpipe.errors import FluxpipeError
from fluxpipe.inference.report_images import save_png
from fluxpipe.inference.sampler import ModelFiles, encode_texts, load_lora, load_sampler, lora_line, split_lora

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class SampleConfig:
    models: ModelFiles
    prompts: tuple[SamplePrompt, ...]
    out: Path  # the PNG (one prompt) or a folder (several: <index>_<seed>.png)
    seed: int = 0
    loras: tuple[tuple[Path, float], ...] = ()
    merge: bool = True
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    t5_max_length: int = 512
    apply_t5_attn_mask: bool = False
    blocks_to_swap: int = 0
    compile_blocks: bool = False
    controlnet: Path | None = None  # a ControlNet-Flux for prompts with a control image
    reference_size: str = "kontext"  # Kontext reference resize: kontext (official) or target (the sample's size)
    model_type: str = "flux"  # chroma: models.flux is a Chroma DiT (T5 mask, guidance 0, the shifted schedule)


def parse_lora_arg(value: str) -> tuple[Path, float]:
    """``path[:multiplier]`` (multiplier 1.0 when absent)."""
    path, sep, mult = value.rpartition(":")
    if sep:
        try:
            return Path(path), float(mult)
        except ValueError:
            pass
    return Path(value), 1.0


def output_paths(cfg: SampleConfig) -> list[Path]:
    if len(cfg.prompts) == 1:
        return [cfg.out]
    return [cfg.out / f"{p.index:02d}_{cfg.seed if p.seed is None else p.seed}.png" for p in cfg.prompts]


def run(cfg: SampleConfig) -> list[Path]:
    for path, _ in cfg.loras:
        if not path.is_file():
            raise FluxpipeError(f"{path}: no such LoRA file (--lora path[:multiplier])")
    if len(cfg.prompts) == 1 and cfg.out.suffix.lower() != ".png":
        raise FluxpipeError(f"--out {cfg.out}: one prompt writes one PNG file; name it *.png")
    loaded = [(path, *load_lora(path)) for path, _ in cfg.loras]
    loras = [(split_lora(kohya), mult) for (_, _, kohya), (_, mult) in zip(loaded, cfg.loras, strict=True)]
    texts = [p.prompt for p in cfg.prompts] + [p.negative_prompt for p in cfg.prompts if p.cfg_scale != 1.0]
    conds = encode_texts(
        cfg.models,
        texts,
        device=cfg.device,
        dtype=cfg.dtype,
        max_length=cfg.t5_max_length,
        apply_t5_attn_mask=cfg.apply_t5_attn_mask,
        loras=loras,
    )
    sampler = load_sampler(
        cfg.models,
        device=cfg.device,
        dtype=cfg.dtype,
        loras=loras,
        merge=cfg.merge,
        blocks_to_swap=cfg.blocks_to_swap,
        apply_t5_attn_mask=cfg.apply_t5_attn_mask,
        compile_blocks=cfg.compile_blocks,
        controlnet=cfg.controlnet,
        reference_size=cfg.reference_size,
        model_type=cfg.model_type,
    )
    for path, layout, kohya in loaded:  # every module matched its layer (apply_lora is strict): all patched
        print(lora_line(path, layout, kohya))
    written = []
    for p, out in zip(cfg.prompts, output_paths(cfg), strict=True):
        seed = cfg.seed if p.seed is None else p.seed
        negative = conds[p.negative_prompt] if p.cfg_scale != 1.0 else None
        image = sampler.image(p, conds[p.prompt], negative, seed)
        written.append(save_png(image, out))
        log.info("wrote %s (%dx%d, %d steps, seed %d)", out, image.width, image.height, p.steps, seed)
    return written
