"""Benchmarks behind `fluxpipe bench <workload>`; each prints one JSON line per measurement.

``caches``: the latent and text caching stages end to end (manifest, image decoding, AE / CLIP-L / T5-XXL
encoding, shard writing) on random-initialised models of the full FLUX.1 sizes (``--tiny``: the demo sizes)
and generated 1024² images. ``dryrun``: Snakemake's planning time (`snakemake -n`) on a large dataset.
Numbers for docs/benchmarks.md come from these commands, never from timed unit tests.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
from PIL import Image
from torch import nn

from fluxpipe.config.dataset import parse_datasets
from fluxpipe.data.prompts import SamplePrompt
from fluxpipe.inference.sampler import Conditioning, Sampler, compile_resident_blocks
from fluxpipe.io.safetensors_file import save_safetensors
from fluxpipe.lora.network import FluxLoRANetwork, LoraSpec
from fluxpipe.memory.block_swap import BlockSwapper
from fluxpipe.memory.fp8 import store_linears_fp8
from fluxpipe.models import text_encoders as te
from fluxpipe.models.autoencoder import FLUX1_AE, AutoEncoder
from fluxpipe.models.controlnet import ControlledFlux, ControlNetFlux
from fluxpipe.models.flux import PRESETS, Flux
from fluxpipe.stages import cache_latents, cache_text, manifest
from fluxpipe.tools.demo import CLIP_DIR, T5_DIR, write_clip_tokenizer, write_demo_models, write_t5_tokenizer
from fluxpipe.training.loss import FlowSettings, flow_loss
from fluxpipe.training.weights import OptimizerSettings, WeightOptimizers

# T5-XXL's tensor shapes that t5_config_from_shapes reads
T5_SHAPES: dict[str, tuple[int, ...]] = {
    "shared.weight": (32128, 4096),
    "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 64),
    "encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096),
    "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": (10240, 4096),
    **{f"encoder.block.{i}.layer.0.SelfAttention.q.weight": (4096, 4096) for i in range(24)},
}


def emit(record: dict[str, object]) -> None:
    print(json.dumps(record), flush=True)


def make_images(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """Smooth random colour images (photo-like JPEG sizes) with one-line captions, all distinct."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
        image.save(folder / f"img{i:05d}.jpg", quality=90)
        (folder / f"img{i:05d}.txt").write_text(f"benchmark image number {i}, a smooth gradient of colours\n")


def write_full_models(out: Path, device: str) -> dict[str, Path]:
    """Random full-size AE, CLIP-L and T5-XXL in the official single-file layouts (weights made on ``device``)."""
    write_clip_tokenizer(out / CLIP_DIR)
    write_t5_tokenizer(out / T5_DIR)
    clip_shapes: dict[str, tuple[int, ...]] = {
        "text_model.embeddings.token_embedding.weight": (49408, 768),
        "text_model.embeddings.position_embedding.weight": (77, 768),
        **{f"text_model.encoder.layers.{i}.mlp.fc1.weight": (3072, 768) for i in range(12)},
    }
    builders: dict[str, tuple[Callable[[], nn.Module], torch.dtype, str, str]] = {
        "ae": (lambda: AutoEncoder(FLUX1_AE), torch.float32, "ae.safetensors", ""),
        "clip_l": (
            lambda: te.build_clip(te.clip_config_from_shapes(clip_shapes)),
            torch.float16,
            "clip_l.safetensors",
            te.CLIP_FILE_PREFIX,
        ),
        "t5xxl": (
            lambda: te.build_t5(te.t5_config_from_shapes(T5_SHAPES)),
            torch.float16,
            "t5xxl_fp16.safetensors",
            "",
        ),
    }
    paths: dict[str, Path] = {}
    for slot, (build, dtype, name, prefix) in builders.items():
        with torch.device(device):
            model = build().to(dtype)
        state = {prefix + k: v.contiguous() for k, v in model.state_dict().items() if "position_ids" not in k}
        if slot == "t5xxl":
            state["encoder.embed_tokens.weight"] = state["encoder.embed_tokens.weight"].clone()
        paths[slot] = out / name
        save_safetensors({k: v.cpu() for k, v in state.items()}, paths[slot])
        del model, state
    paths["clip_tokenizer"], paths["t5_tokenizer"] = out / CLIP_DIR, out / T5_DIR
    return paths


def bench_caches(
    work: Path, images: int, size: int, device: str, tiny: bool, vae_batch: int, text_batch: int, workers: int
) -> None:
    """Time the manifest, latent and text stages on generated data (one shard each)."""
    models = write_demo_models(work / "models") if tiny else write_full_models(work / "models", device)
    make_images(work / "images", images, size)
    man, hashes = work / "manifest.parquet", work / "hashes.json"
    _bench_manifest(work / "images", man, hashes, images, size, workers)
    for kind in ("latents", "text"):
        out = work / f"{kind}.safetensors"
        start = time.perf_counter()
        if kind == "latents":
            cfg_latents = cache_latents.CacheLatentsConfig(
                manifest=man,
                ae=models["ae"],
                out=out,
                shard=0,
                batch_size=vae_batch,
                dtype="bfloat16",
                device=device,
                decode_workers=workers,
                hash_cache=hashes,
            )
            stats = cache_latents.run(cfg_latents)
        else:
            stats = cache_text.run(_text_config(man, models, out, hashes, text_batch, device))
        wall = time.perf_counter() - start
        emit(
            {
                "stage": f"cache_{kind}",
                "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                "models": "tiny" if tiny else "full-size",
                "items": stats.encoded,
                "size": size,
                "batch": vae_batch if kind == "latents" else text_batch,
                "encode_seconds": stats.seconds,
                "items_per_s": round(stats.encoded / stats.seconds, 2) if stats.seconds else None,
                "stage_seconds": round(wall, 2),
                "stage_items_per_s": round(stats.encoded / wall, 2),
            }
        )


def _bench_manifest(images_dir: Path, man: Path, hashes: Path, images: int, size: int, workers: int) -> None:
    datasets = parse_datasets(
        {
            "general": {"caption_extension": ".txt"},
            "datasets": [{"resolution": size, "subsets": [{"image_dir": str(images_dir)}]}],
        },
        source="bench",
    )
    start = time.perf_counter()
    manifest.run(
        manifest.ManifestConfig(
            datasets=datasets, out=man, latent_shards=1, text_shards=1, hash_cache=hashes, workers=workers
        )
    )
    emit({"stage": "manifest", "images": images, "seconds": round(time.perf_counter() - start, 2)})


def _text_config(
    man: Path, models: dict[str, Path], out: Path, hashes: Path, batch: int, device: str
) -> cache_text.CacheTextConfig:
    return cache_text.CacheTextConfig(
        manifest=man,
        clip_l=models["clip_l"],
        t5xxl=models["t5xxl"],
        clip_tokenizer=models["clip_tokenizer"],
        t5_tokenizer=models["t5_tokenizer"],
        out=out,
        shard=0,
        max_length=512,
        batch_size=batch,
        device=device,
        hash_cache=hashes,
    )


def bench_encoders(device: str, repeats: int = 5) -> None:
    """Pure encoder throughput (no I/O): full-size AE at 1024² and T5-XXL at 512 tokens, bf16; eager and
    with fluxpipe's speed settings (channels-last + cuDNN autotuning for the AE, torch.compile for T5)."""
    with torch.device(device):
        ae = AutoEncoder(FLUX1_AE).to(torch.bfloat16).eval()
    for fast in (False, True):
        torch.backends.cudnn.benchmark = fast
        # torch's stub of Module.to lacks the memory_format keyword that Module.to documents and accepts
        ae = ae.to(memory_format=torch.channels_last if fast else torch.contiguous_format)  # type: ignore[call-overload]
        for batch in (8, 16):
            x = torch.randn(batch, 3, 1024, 1024, device=device, dtype=torch.bfloat16)
            if fast:
                x = x.to(memory_format=torch.channels_last)
            emit(
                {
                    "encoder": "ae",
                    "channels_last+cudnn_benchmark": fast,
                    "batch": batch,
                    "items_per_s": round(batch / _time(functools.partial(ae.encoder, x), repeats), 2),
                }
            )
    del ae
    with torch.device(device):
        t5: nn.Module = te.build_t5(te.t5_config_from_shapes(T5_SHAPES))
        t5 = t5.to(torch.bfloat16).eval()
    for compiled in (False, True):
        model = torch.compile(t5) if compiled else t5
        for batch in (32, 64):
            ids = torch.randint(0, 32000, (batch, 512), device=device)
            start = time.perf_counter()
            with torch.no_grad():
                model(ids)  # first call: compiles when compiled
            first = time.perf_counter() - start
            emit(
                {
                    "encoder": "t5xxl",
                    "compiled": compiled,
                    "tokens": 512,
                    "batch": batch,
                    "first_call_s": round(first, 1),
                    "items_per_s": round(batch / _time(functools.partial(model, ids), repeats), 2),
                }
            )


@torch.no_grad()
def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def bench_dryrun(work: Path, images: int, repo: Path) -> None:
    """Planning time of `snakemake -n` on a dataset of ``images`` files, before and after the manifest exists."""
    for name in ("Snakefile", "rules", "config"):
        src = repo / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    folder = work / "data"
    folder.mkdir()
    tiny = Image.new("RGB", (64, 64), (10, 20, 30))
    for i in range(images):
        tiny.save(folder / f"img{i:05d}.png")
        (folder / f"img{i:05d}.txt").write_text(f"caption {i % 100}\n")
    (work / "data.toml").write_text(
        '[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\n'
        '[[datasets.subsets]]\nimage_dir = "data"\n'
    )
    (work / "bench.yaml").write_text("dataset_config: data.toml\ncache:\n  latent_shards: 100\n  text_shards: 100\n")
    exe = str(Path(sys.executable).parent / "snakemake")
    targets = ["cache_latents", "cache_text_encoder_outputs", "--configfile", "bench.yaml"]
    for label, args in (
        ("dry-run, fresh", ["-n", *targets]),
        ("manifest job", ["dataset_manifest", *targets[2:]]),
        ("dry-run, manifest present", ["-n", *targets]),
    ):
        start = time.perf_counter()
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        result = subprocess.run([exe, "--cores", "1", *args], cwd=work, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-2000:])
        emit({"step": label, "images": images, "seconds": round(time.perf_counter() - start, 2)})


TRAIN_CONFIGS = (
    "ckpt",
    "none",
    "ckpt+compile",
    "none+compile",
    "swap18",
    "swap28",
    "fp8+ckpt",
    "fp8+swap28",
    "offload+ckpt",
)


class TrainConfig(TypedDict):
    gradient_checkpointing: bool
    compile: bool
    blocks_to_swap: int
    fp8_base: bool
    cpu_offload_checkpointing: bool


def parse_train_config(name: str) -> TrainConfig:
    """'ckpt' / 'none' (gradient checkpointing or not), '+compile' (compiled blocks), 'swapN' (blocks_to_swap N,
    checkpointed), 'fp8+' (fp8 base weights), 'offload+ckpt' (cpu_offload_checkpointing)."""
    parts = name.split("+")
    swap = next((int(p[4:]) for p in parts if p.startswith("swap")), 0)
    known = {"ckpt", "none", "compile", "fp8", "offload"}
    if any(p not in known and not p.startswith("swap") for p in parts):
        raise ValueError(f"unknown benchmark configuration {name!r}; known: {', '.join(TRAIN_CONFIGS)}")
    return {
        "gradient_checkpointing": "none" not in parts,
        "compile": "compile" in parts,
        "blocks_to_swap": swap,
        "fp8_base": "fp8" in parts,
        "cpu_offload_checkpointing": "offload" in parts,
    }


def _bench_model(device: str, cfg: TrainConfig) -> tuple[Flux, FluxLoRANetwork]:
    with torch.device(device):
        dit = Flux(PRESETS["dev"]).to(torch.bfloat16)
    dit.requires_grad_(False)
    if cfg["fp8_base"]:
        store_linears_fp8(dit)
    if cfg["blocks_to_swap"]:
        dit.block_swapper = BlockSwapper(dit, cfg["blocks_to_swap"], device)
        dit.block_swapper.place(dit)
        torch.cuda.empty_cache()
    dit.gradient_checkpointing = cfg["gradient_checkpointing"]
    dit.cpu_offload_checkpointing = cfg["cpu_offload_checkpointing"]
    network = FluxLoRANetwork(dit, LoraSpec(network_dim=16, network_alpha=16)).to(device)
    network.apply_to()
    if cfg["compile"]:
        compile_resident_blocks(dit)
    return dit.train(), network


def bench_train(device: str, configs: tuple[str, ...] = ("ckpt", "none"), steps: int = 6) -> None:
    """LoRA training steps on a random-initialised full-size FLUX.1-dev (gpu-targets.md's workload): 1024²
    (4096 image tokens), 512 text tokens, rank 16, batch 1, bf16 base, AdamW; s/step and peak memory. Each
    configuration builds its model afresh on the device (the swapped weights then move to pinned host memory)."""
    for name in configs:
        cfg = parse_train_config(name)
        torch._dynamo.reset()
        dit, network = _bench_model(device, cfg)
        gc.collect()
        opt = torch.optim.AdamW(network.parameters(), lr=1e-4)
        gen, batch = torch.Generator().manual_seed(0), _bench_batch(device)
        params = sum(p.numel() for p in dit.parameters())
        torch.cuda.reset_peak_memory_stats()

        def step(
            dit: Flux = dit,
            opt: torch.optim.Optimizer = opt,
            batch: dict[str, torch.Tensor] = batch,
            gen: torch.Generator = gen,
        ) -> None:
            flow_loss(dit, batch, FlowSettings(), gen).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        first, times = _timed_steps(step, steps)  # two warm-up steps (the first compiles)
        median = times[len(times) // 2]
        # forward 2·N·tokens; backward 2·N·tokens (input gradients only: the base weights are frozen, the LoRA's
        # own gradients are negligible); recomputed blocks run the forward once more
        recompute = cfg["gradient_checkpointing"] or cfg["blocks_to_swap"]
        flops = (2 + 2 + (2 if recompute else 0)) * params * (4096 + 512)
        emit(
            {
                "workload": "lora rank 16, 1024², 512 tokens, batch 1",
                "config": name,
                **cfg,
                "device": torch.cuda.get_device_name(),
                "first_step_s": round(first, 1),
                "s_per_step_median": round(median, 3),
                "s_per_step_min": round(times[0], 3),
                "s_per_step_max": round(times[-1], 3),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "tflops_est": round(flops / median / 1e12, 1),
            }
        )
        del dit, network, opt, batch, step  # (step's defaults hold the model too)
        gc.collect()  # the model, its swapper and its LoRA reference each other: free them before the next one
        torch.cuda.empty_cache()


def bench_sample(device: str, steps: int = 28, size: int = 1024, images: int = 3, compile_blocks: bool = False) -> None:
    """Seconds per image of the official sampler on a random-initialised full-size FLUX.1-dev and AE (bf16):
    ``size``² pixels, ``steps`` Euler steps, 512 text tokens (random conditioning: the encoders are not part of
    the per-image time); the first image is a warm-up."""
    with torch.device(device):
        dit = Flux(PRESETS["dev"]).to(torch.bfloat16).requires_grad_(False).eval()
        ae = AutoEncoder(FLUX1_AE).to(torch.bfloat16).requires_grad_(False).eval()
    if compile_blocks:
        compile_resident_blocks(dit)
    sampler = Sampler(dit, ae, device=device, dtype=torch.bfloat16)
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    cond = Conditioning(torch.randn(1, 512, 4096), torch.randn(1, 768), torch.ones(1, 512, dtype=torch.int64))
    prompt = SamplePrompt(index=0, prompt="bench", width=size, height=size, steps=steps)
    times = []
    for i in range(images + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        sampler.image(prompt, cond, None, seed=i)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    emit(
        {
            "workload": f"sample {size}² {steps} steps, 512 tokens",
            "compiled_blocks": compile_blocks,
            "device": torch.cuda.get_device_name(),
            "first_image_s": round(times[0], 2),
            "s_per_image_median": round(sorted(times[1:])[len(times[1:]) // 2], 3),
            "s_per_image_min": round(min(times[1:]), 3),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        }
    )
    del dit, ae, sampler
    gc.collect()
    torch.cuda.empty_cache()


def _bench_batch(device: str) -> dict[str, torch.Tensor]:
    return {
        "latents": torch.randn(1, 16, 128, 128, device=device, dtype=torch.bfloat16),
        "t5": torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16),
        "pooled": torch.randn(1, 768, device=device, dtype=torch.bfloat16),
        "t5_mask": torch.ones(1, 512, dtype=torch.bool, device=device),
    }


def _timed_steps(step: Callable[[], None], steps: int) -> tuple[float, list[float]]:
    """(first step's seconds, the sorted seconds of the steps after two warm-up steps)."""
    times: list[float] = []
    first = 0.0
    for i in range(steps + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i == 0:
            first = time.perf_counter() - start
        if i >= 2:
            times.append(time.perf_counter() - start)
    return first, sorted(times)


def _weights_setup(method: str, device: str) -> tuple[Flux, nn.Module, nn.Module, OptimizerSettings]:
    """(base DiT, the model a step runs, the trained module, its optimizer settings) of one bench_weights method."""
    with torch.device(device):
        dit = Flux(PRESETS["dev"]).to(torch.bfloat16)
    dit.gradient_checkpointing = True
    if method.startswith("full"):  # "full" or "full+swapN" (the swapped weights trained in host memory)
        dit.requires_grad_(True).train()
        if "swap" in method:
            dit.block_swapper = BlockSwapper(dit, int(method.split("swap")[1]), device)
            dit.block_swapper.place(dit)
        settings = OptimizerSettings(
            optimizer_type="Adafactor",
            learning_rate=1e-5,
            fused_backward_pass=True,
            max_grad_norm=0.0,
            optimizer_args={"relative_step": False, "scale_parameter": False, "warmup_init": False},
        )
        return dit, dit, dit, settings
    dit.requires_grad_(False).train()
    with torch.device(device):
        controlnet = ControlNetFlux(dit.params)
    controlnet.gradient_checkpointing = True
    hint = torch.rand(1, 3, 1024, 1024, device=device) * 2 - 1
    model = ControlledFlux(dit, controlnet, hint)
    return dit, model, controlnet, OptimizerSettings(optimizer_type="AdamW", learning_rate=1e-5)


def bench_weights(device: str, methods: tuple[str, ...] = ("full", "controlnet"), steps: int = 4) -> None:
    """Full fine-tune (every DiT weight trained: bf16 weights, Adafactor with the fused backward pass,
    checkpointing — the reference README's 24 GB recipe) and ControlNet training (frozen bf16 base, fp32
    ControlNet, AdamW, checkpointing, a 1024² control image) on the gpu-targets workload: s/step, peak GiB."""
    for method in methods:
        dit, model, trained, settings = _weights_setup(method, device)
        gen, batch = torch.Generator().manual_seed(0), _bench_batch(device)
        optim = WeightOptimizers(trained, settings, total_steps=steps + 2)
        gc.collect()
        torch.cuda.reset_peak_memory_stats()

        def step(
            model: nn.Module = model,
            optim: WeightOptimizers = optim,
            batch: dict[str, torch.Tensor] = batch,
            gen: torch.Generator = gen,
            mixed: bool = method == "controlnet",
            swapper: BlockSwapper | None = dit.block_swapper,
        ) -> None:
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=mixed):
                loss = flow_loss(model, batch, FlowSettings(), gen)
            loss.backward()
            optim.step()
            if swapper is not None:
                swapper.invalidate()

        first, times = _timed_steps(step, steps)
        emit(
            {
                "workload": "1024², 512 tokens, batch 1, gradient checkpointing",
                "method": method,
                "trained_params": sum(p.numel() for p in trained.parameters()),
                "device": torch.cuda.get_device_name(),
                "first_step_s": round(first, 1),
                "s_per_step_median": round(times[len(times) // 2], 3),
                "s_per_step_min": round(times[0], 3),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            }
        )
        optim.remove()
        del dit, model, trained, optim, batch, step  # (step's defaults hold the model too)
        gc.collect()
        torch.cuda.empty_cache()
