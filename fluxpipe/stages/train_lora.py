"""LoRA training stage: the DiT learns a kohya-layout LoRA from the cached latents and text outputs.

Input: the strict-loaded DiT, the manifest and both cache indexes. Output: ``<output_dir>/<name>.safetensors``
(plus per-epoch / per-step files and ``-state`` folders when asked) in the kohya/ComfyUI layout with ss_* and
modelspec metadata, and ``<name>-loss.jsonl``. One explicit loop; the maths lives in fluxpipe.maths.flow, the
data in fluxpipe.data.batches, the state in fluxpipe.training.state. A run resumes exactly from a state folder.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from fluxpipe.data.batches import CachedTensors, epoch_batches, epoch_captions, load_items, make_batch
from fluxpipe.errors import FluxpipeError
from fluxpipe.inference.sampler import ModelFiles
from fluxpipe.io.atomic import remove_stale_temps, write_text_atomic
from fluxpipe.io.checkpoints import load_model
from fluxpipe.lora.network import FluxLoRANetwork, LoraSpec
from fluxpipe.maths import flow
from fluxpipe.maths.kontext import kontext_forward, reference_tokens
from fluxpipe.maths.packing import image_ids, pack_latents, text_ids
from fluxpipe.parallel.distributed import world, wrap
from fluxpipe.training.ema import EmaSettings, ema_metadata, save_beside
from fluxpipe.training.ema import create as create_ema
from fluxpipe.training.log import TrainLogger
from fluxpipe.training.loss import packed_mask, weighted_loss
from fluxpipe.training.monitor import Monitor, MonitorSettings, validation_loss
from fluxpipe.training.optim import build_optimizer, build_scheduler, load_optimizer_state, resolve_warmup
from fluxpipe.training.state import TrainState, capture_rng, load_state, newest_state, restore_rng, save_state

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class FlowSettings:
    """The training-maths flags (spec §4), names as the reference's."""

    timestep_sampling: str = "flux_shift"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    model_prediction_type: str = "raw"
    guidance_scale: float = 1.0
    loss_type: str = "l2"
    huber_schedule: str = "constant"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    apply_t5_attn_mask: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainLoraConfig:
    flux: Path
    manifest: Path
    latent_index: Path
    text_index: Path
    output_dir: Path
    output_name: str
    batch_sizes: dict[int, int]
    lora: LoraSpec
    math: FlowSettings = field(default_factory=FlowSettings)
    network_weights: Path | None = None
    learning_rate: float = 1e-4
    unet_lr: float | None = None
    optimizer_type: str = "AdamW"
    optimizer_args: dict = field(default_factory=dict)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int | float | str | None = None
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    max_train_steps: int = 1600
    max_train_epochs: int | None = None
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    compute_dtype: torch.dtype = torch.float32
    seed: int = 42
    gradient_checkpointing: bool = False
    save_every_n_epochs: int | None = None
    save_every_n_steps: int | None = None
    save_precision: torch.dtype | None = None
    save_state: bool = False
    save_last_n_epochs: int | None = None  # keep only the newest n per-epoch files (and states)
    save_last_n_epochs_state: int | None = None
    save_last_n_steps: int | None = None  # keep only the per-step files of the last n steps
    save_last_n_steps_state: int | None = None
    resume: Path | None = None
    auto_resume: bool = False
    device: str = "cpu"
    metadata: dict = field(default_factory=dict)
    fp8_base: bool = False  # the DiT's Linear weights stored as float8_e4m3fn, upcast per matmul
    clip_l: Path | None = None  # given: the CLIP-L LoRA is trained too (pooled vector recomputed each step)
    clip_tokenizer: Path | None = None
    text_encoder_lr: tuple[float, ...] | None = None
    blocks_to_swap: int = 0  # stream the last blocks' weights from pinned host memory (fluxpipe.memory.block_swap)
    cpu_offload_checkpointing: bool = False
    torch_compile: bool = False  # compile each resident block (regional compilation)
    dynamo_backend: str = "inductor"
    network_dtype: torch.dtype = torch.float32  # --full_bf16: the LoRA weights (and their optimizer) in bf16
    save_n_epoch_ratio: int | None = None  # at least this many per-epoch saves: every max(1, epochs // n) epochs
    logging_dir: Path | None = None
    log_prefix: str = ""
    log_tracker_name: str = ""  # a subfolder of the run folder for the event files ("": none)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)  # samples and validation loss
    sample_models: ModelFiles | None = None  # AE and text encoders for the samples' prompts
    t5_max_length: int = 512
    stop_at_step: int | None = None  # end this job (one segment of a chained run) at this step, state written
    ema: EmaSettings | None = (
        None  # --ema_decay: an EMA of the LoRA, saved as <name>-ema.safetensors (fluxpipe.training.ema)
    )
    kontext: bool = False  # --model_type kontext: every item trains with its cached reference latent
    prior_loss_weight: float = 1.0  # loss weight of the regularisation (is_reg) images


def draw_flow_noise(batch: dict, m: FlowSettings, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A batch's random draws, in order (spec §4.2): timesteps t [B], noise, and the noise that makes x_t
    (``--ip_noise_gamma`` perturbed, else the noise itself)."""
    x0 = batch["latents"]
    bsz, _, h, w = x0.shape
    t = flow.sample_timesteps(
        m.timestep_sampling,
        bsz,
        (h // 2) * (w // 2),
        gen,
        sigmoid_scale=m.sigmoid_scale,
        discrete_flow_shift=m.discrete_flow_shift,
        weighting_scheme=m.weighting_scheme,
        logit_mean=m.logit_mean,
        logit_std=m.logit_std,
        mode_scale=m.mode_scale,
    ).to(x0.device)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
    perturbed = (
        flow.ip_noise(noise, m.ip_noise_gamma, gen, random_strength=m.ip_noise_gamma_random_strength)
        if m.ip_noise_gamma
        else noise
    )
    return t, noise, perturbed


def flow_loss(
    dit: torch.nn.Module,
    batch: dict,
    m: FlowSettings,
    gen: torch.Generator,
    rows: list[int] | None = None,
    network: FluxLoRANetwork | None = None,
) -> torch.Tensor:
    """Mean loss of one batch: ``draw_flow_noise``, then ``prediction_loss``. With ``rows`` (a data-parallel
    rank's share) every draw is still made for the whole batch, then only those rows compute."""
    draws = draw_flow_noise(batch, m, gen)
    if rows is not None:
        batch, draws = select_rows(batch, draws, rows)
    t, noise, perturbed = draws
    return prediction_loss(dit, batch, m, t, noise, perturbed, network=network).mean()


def select_rows(batch: dict, draws: tuple[torch.Tensor, ...], rows: list[int]) -> tuple[dict, tuple]:
    """A data-parallel rank's rows of a batch and of its random draws."""
    index = torch.tensor(rows, dtype=torch.long)
    return (
        {k: v[index.to(v.device)] if isinstance(v, torch.Tensor) else v for k, v in batch.items()},
        tuple(d[index.to(d.device)] for d in draws),
    )


class LoraLoss(torch.nn.Module):
    """One rank's loss of a batch, as a module whose only parameters are the LoRA's (what DDP wraps)."""

    def __init__(self, network: FluxLoRANetwork, dit: torch.nn.Module, m: FlowSettings, pooled_fn=None) -> None:  # noqa: ANN001
        super().__init__()
        self.network, self.dit, self.m, self.pooled_fn = network, [dit], m, pooled_fn  # (the DiT is not registered)

    def forward(
        self, batch: dict, gen: torch.Generator, rows: list[int] | None, captions: list[str] | None
    ) -> torch.Tensor:
        if self.pooled_fn is not None:  # a trained CLIP-L LoRA: its pooled vector, inside DDP's forward
            batch = {**batch, "pooled": self.pooled_fn(captions)}
        if rows == []:  # a short batch left this rank nothing: a zero loss that still reaches every parameter
            draw_flow_noise(batch, self.m, gen)  # the same draws as the other ranks, no forward pass
            return sum(p.sum() for p in self.network.parameters()) * 0.0
        return flow_loss(self.dit[0], batch, self.m, gen, rows=rows, network=self.network)


def prediction_loss(
    dit: torch.nn.Module,
    batch: dict,
    m: FlowSettings,
    t: torch.Tensor,
    noise: torch.Tensor,
    perturbed: torch.Tensor | None = None,
    network: FluxLoRANetwork | None = None,
) -> torch.Tensor:
    """Per-item loss [B] at timesteps ``t``: x_t from ``perturbed`` noise (default ``noise``), velocity prediction
    against noise - x0 (the validation loss calls this with fixed t and noise), masked by the batch's
    ``loss_mask`` and weighted by its ``loss_weights`` (``fluxpipe.training.loss.weighted_loss``). A Kontext batch's ``reference``
    latents join the sequence un-noised (``fluxpipe.maths.kontext``); the loss is on the target tokens only."""
    x0 = batch["latents"]
    bsz, _, h, w = x0.shape
    device, dtype = x0.device, x0.dtype
    x_t = flow.noisy_latents(x0, noise if perturbed is None else perturbed, t.to(dtype))
    img = pack_latents(x_t)
    txt = batch["t5"]
    reference = reference_tokens(batch["reference"]) if "reference" in batch else None  # Kontext: loss on targets
    forward = functools.partial(
        kontext_forward,
        dit,
        img,
        image_ids(bsz, h, w, device=device, dtype=dtype),
        reference,
        txt=txt,
        txt_ids=text_ids(bsz, txt.shape[1], device=device, dtype=dtype),
        timesteps=t.to(dtype),
        y=batch["pooled"],
        guidance=torch.full((bsz,), m.guidance_scale, device=device, dtype=dtype),
        txt_attention_mask=batch["t5_mask"] if m.apply_t5_attn_mask else None,
    )
    pred = flow.apply_prediction_type(forward().float(), img.float(), t, m.model_prediction_type)
    target = pack_latents(flow.velocity_target(x0, noise)).float()
    if network is not None and batch.get("preserve") is not None and bool(batch["preserve"].any()):
        base = base_prediction(network, forward)
        base = flow.apply_prediction_type(base.float(), img.float(), t, m.model_prediction_type)
        target = preserved_targets(target, base, batch["preserve"])
    weighting = flow.loss_weighting(m.weighting_scheme, t) if m.model_prediction_type == "sigma_scaled" else None
    c = (
        flow.huber_c(m.huber_schedule, m.huber_c, t, huber_scale=m.huber_scale)
        if m.loss_type in ("huber", "smooth_l1")
        else None
    )
    mask = packed_mask(batch["loss_mask"]) if batch.get("loss_mask") is not None else None
    loss = flow.loss(pred, target, m.loss_type, c, weighting=weighting, mask=mask)
    return weighted_loss(loss, None, batch.get("loss_weights"))


def base_prediction(network: FluxLoRANetwork, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The base model's prediction (LoRA multiplier 0, no gradient) for differential output preservation."""
    multiplier = network.multiplier
    network.set_multiplier(0.0)
    try:
        with torch.no_grad():
            return forward()
    finally:
        network.set_multiplier(multiplier)


def preserved_targets(target: torch.Tensor, base: torch.Tensor, preserve: torch.Tensor) -> torch.Tensor:
    """Differential output preservation (spec §4.5): the rows of a subset with custom_attributes
    diff_output_preservation = true train towards the base model's processed prediction instead of noise - x0."""
    rows = preserve.bool().to(target.device).reshape(-1, *([1] * (target.dim() - 1)))
    return torch.where(rows, base.to(target.dtype), target)


def clip_pooled(clip: torch.nn.Module, tokenizer, captions: list[str], dtype: torch.dtype) -> torch.Tensor:  # noqa: ANN001
    """CLIP-L pooled vectors [B, 768] with gradients to the CLIP LoRA (the T5 outputs stay cached)."""
    from fluxpipe.data.text_encoding import CLIP_MAX_LENGTH

    ids = tokenizer(
        captions, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
    return clip(ids.to(next(clip.parameters()).device)).pooler_output.to(dtype)


def segment_suffix(step: int) -> str:
    """The state folder a segment that stops at ``step`` leaves: ``<name>-seg00000100-state``."""
    return f"-seg{step:08d}"


def check_segment(stop_at_step: int | None, step: int) -> None:
    if stop_at_step is not None and stop_at_step <= step:
        raise FluxpipeError(
            f"--stop_at_step {stop_at_step}: the resumed run is already at step {step}; give a "
            "later step, or resume from an earlier state"
        )


def epoch_save_interval(save_every_n_epochs: int | None, save_n_epoch_ratio: int | None, epochs: int) -> int | None:
    """Epochs between per-epoch saves: --save_n_epoch_ratio n (at least n saves) overrides --save_every_n_epochs
    with max(1, epochs // n), as the reference."""
    if save_n_epoch_ratio:
        return max(1, epochs // save_n_epoch_ratio)
    return save_every_n_epochs


def plan_steps(num_batches: int, cfg: TrainLoraConfig) -> tuple[int, int]:
    """(total optimizer steps, epochs): --max_train_epochs overrides --max_train_steps, as the reference."""
    per_epoch = math.ceil(num_batches / cfg.gradient_accumulation_steps)
    if cfg.max_train_epochs:
        return cfg.max_train_epochs * per_epoch, cfg.max_train_epochs
    return cfg.max_train_steps, math.ceil(cfg.max_train_steps / per_epoch)


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """The reference's sshs_model_hash / sshs_legacy_hash (spec §5.7): sha256 of the tensor-data section, and
    the first 8 hex digits of sha256 of the 64 KiB at 1 MiB, of a serialization carrying only ss_* metadata."""
    import hashlib
    import struct

    from safetensors.torch import save

    blob = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    (header,) = struct.unpack("<Q", blob[:8])
    return {
        "sshs_model_hash": hashlib.sha256(blob[8 + header :]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8],
    }


def save_lora(
    network: FluxLoRANetwork,
    cfg: TrainLoraConfig,
    suffix: str,
    step: int,
    epoch: int,
    extra: dict[str, str] | None = None,
) -> Path:
    from fluxpipe.io.safetensors_file import save_safetensors

    path = cfg.output_dir / f"{cfg.output_name}{suffix}.safetensors"
    meta = {
        **cfg.metadata,
        "ss_steps": str(step),
        "ss_epoch": str(epoch),
        "ss_training_finished_at": str(int(time.time())),
        **(extra or {}),
    }
    tensors = network.state_dict_kohya(cfg.save_precision)
    save_safetensors(tensors, path, {**meta, **addnet_hashes(tensors, meta)})
    log.info("saved %s (step %d, epoch %d)", path, step, epoch)
    return path


def prune_old(cfg: TrainLoraConfig, kind: str, current: int, every: int | None) -> None:
    """--save_last_n_epochs / --save_last_n_steps (and their _state forms): remove the file (and state) saved
    n saves ago, as the reference does."""
    keep, keep_state = (
        (cfg.save_last_n_epochs, cfg.save_last_n_epochs_state)
        if kind == "epoch"
        else (cfg.save_last_n_steps, cfg.save_last_n_steps_state)
    )
    keep_state = keep_state or keep
    for n, is_state in ((keep, False), (keep_state, True)):
        if not n or not every:
            continue
        old = current - every * n
        if old <= 0:
            continue
        suffix = f"-{old:06d}" if kind == "epoch" else f"-step{old:08d}"
        target = cfg.output_dir / f"{cfg.output_name}{suffix}{'-state' if is_state else '.safetensors'}"
        if is_state and target.is_dir():
            import shutil

            shutil.rmtree(target)
        elif not is_state:
            target.unlink(missing_ok=True)
            target.with_name(f"{target.stem}-ema.safetensors").unlink(missing_ok=True)  # (--ema_decay's file)


def _resume_from(cfg: TrainLoraConfig) -> TrainState | None:
    """--resume DIR (must match the settings), or with auto_resume the newest state made with these settings
    and this data (states of other settings are left alone: a changed run starts afresh)."""
    settings = cfg.metadata.get("fluxpipe_settings")
    folder = cfg.resume or (newest_state(cfg.output_dir, cfg.output_name, settings) if cfg.auto_resume else None)
    if folder is None:
        return None
    state = load_state(folder)
    if state.extra.get("settings") != cfg.metadata.get("fluxpipe_settings"):
        raise FluxpipeError(
            f"{folder}: this state was made with other training settings; resume it with the same "
            "settings, or delete the state folder (or pick another --output_name) to start afresh"
        )
    log.info("resuming from %s at step %d (epoch %d, batch %d)", folder, state.step, state.epoch, state.batch_in_epoch)
    return state


def _write_state(network, opt, sched, gen, cfg, step, epoch, batch_in_epoch, suffix, scaler, ema=None) -> None:  # noqa: ANN001
    weights = {k: v.detach().clone() for k, v in network.state_dict().items()}
    save_state(
        TrainState(
            step=step,
            epoch=epoch,
            batch_in_epoch=batch_in_epoch,
            weights=weights,
            optimizer=opt.state_dict(),
            scheduler=sched.state_dict(),
            rng=capture_rng({"noise": gen}),
            extra={
                "settings": cfg.metadata.get("fluxpipe_settings"),
                "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "ema": ema.state_dict() if ema is not None else None,
            },
        ),
        cfg.output_dir / f"{cfg.output_name}{suffix}-state",
    )


def log_step(
    records: list[dict], logger: TrainLogger, bar: tqdm, step: int, epoch: int, loss: float, lrs: dict[str, float]
) -> None:
    """One optimizer step's loss record, logged scalars (``lrs``: by group, the first one recorded) and bar.
    A NaN/Inf loss stops the run here (all three trainers), before anything of this step is recorded or saved."""
    if not math.isfinite(loss):
        bar.close()  # the error line then starts a line of its own
        raise FluxpipeError(
            f"step {step}: the loss is {loss}; training stopped before saving anything of this step "
            "(the files and state saved before it are kept): lower the learning rate or check the "
            "data and model files, then resume from the last state"
        )
    records.append({"step": step, "epoch": epoch, "loss": loss, "lr": next(iter(lrs.values()))})
    average = logger.step(step, loss, lrs)
    bar.set_postfix(loss=f"{loss:.4f}", avr_loss=f"{average:.4f}", epoch=epoch)
    bar.update(1)


def write_losses(path: Path, records: list[dict], keep_until: int) -> None:
    """``<name>-loss.jsonl``: the records of this job after those of the resumed run up to ``keep_until``."""
    write_text_atomic(
        path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in _log_losses(path, records, keep_until))
    )


def _log_losses(path: Path, records: list[dict], keep_until: int) -> list[dict]:
    """Loss records up to ``keep_until`` steps (a resumed run drops the ones it will redo)."""
    if not path.is_file():
        return records
    old = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in old if r["step"] <= keep_until] + records


def load_dit(cfg: TrainLoraConfig) -> torch.nn.Module:
    """The frozen DiT on the device: fp8 storage, block swap (swapped weights stay in pinned host memory),
    checkpointing mode and compiled blocks as configured."""
    swap = cfg.blocks_to_swap and cfg.device.startswith("cuda")
    dit = load_model(cfg.flux, "flux", dtype=cfg.compute_dtype, device="cpu" if swap else cfg.device)
    dit.gradient_checkpointing = cfg.gradient_checkpointing
    dit.cpu_offload_checkpointing = cfg.cpu_offload_checkpointing
    if cfg.fp8_base:
        from fluxpipe.memory.fp8 import store_linears_fp8

        log.info("fp8_base: %d Linear weights stored as float8_e4m3fn", store_linears_fp8(dit))
    if swap:
        from fluxpipe.memory.block_swap import BlockSwapper

        try:
            swapper = BlockSwapper(dit, cfg.blocks_to_swap, cfg.device)
        except ValueError as e:
            raise FluxpipeError(f"{cfg.flux}: {e}") from e
        swapper.place(dit)
        dit.block_swapper = swapper
        log.info(
            "blocks_to_swap %d: %d double + %d single blocks stream %.2f GB from pinned host memory",
            cfg.blocks_to_swap,
            len(swapper.plan.double),
            len(swapper.plan.single),
            swapper.host_bytes() / 1e9,
        )
    if cfg.torch_compile:
        from fluxpipe.inference.sampler import compile_resident_blocks

        log.info(
            "torch_compile: %d blocks compiled (%s)",
            compile_resident_blocks(dit, cfg.dynamo_backend),
            cfg.dynamo_backend,
        )
    return dit


def build_monitor(
    cfg: TrainLoraConfig,
    dit: torch.nn.Module,
    network: torch.nn.Module,
    tensors: CachedTensors,
    pooled_fn,
    captions: list[str],
    logger: TrainLogger,  # noqa: ANN001
    dtype: torch.dtype | None = None,
    writes: bool = True,
    references: bool = False,
) -> Monitor:
    """Samples (prompts encoded now, encoders freed; the AE kept for decoding) and the validation loss, with the
    DiT computing in ``dtype`` (default: the training's compute dtype). Shared with the full fine-tune."""
    from fluxpipe.parallel.devices import encode_dtype

    s = cfg.monitor
    dtype = dtype or cfg.compute_dtype
    sampler, conds = None, {}
    if s.sample_prompts:
        from fluxpipe.inference.sampler import Sampler, encode_texts

        if cfg.sample_models is None:
            raise FluxpipeError("--sample_prompts needs the model files of --ae, --clip_l and --t5xxl")
        texts = [p.prompt for p in s.sample_prompts] + [p.negative_prompt for p in s.sample_prompts]
        conds = encode_texts(
            cfg.sample_models,
            texts,
            device=cfg.device,
            dtype=encode_dtype(cfg.device),
            max_length=cfg.t5_max_length,
            apply_t5_attn_mask=cfg.math.apply_t5_attn_mask,
        )
        ae = load_model(cfg.sample_models.ae, "ae", dtype=encode_dtype(cfg.device), device=cfg.device)
        sampler = Sampler(dit, ae, device=cfg.device, dtype=dtype, apply_t5_attn_mask=cfg.math.apply_t5_attn_mask)
    items = load_items(cfg.manifest, cfg.latent_index, cfg.text_index, split="val", references=references)
    validation = None
    if items and (s.validate_every_n_epochs or s.validate_every_n_steps):

        def validation() -> dict:
            return validation_loss(
                dit,
                network,
                items,
                tensors,
                cfg.math,
                sigmas=s.sigmas,
                seed=s.validation_seed,
                device=cfg.device,
                dtype=dtype,
                limit=s.max_validation_steps,
                pooled_fn=pooled_fn,
                captions=captions,
            )

    return Monitor(
        s,
        output_dir=cfg.output_dir,
        output_name=cfg.output_name,
        seed=cfg.seed,
        sampler=sampler,
        conds=conds,
        pooled_fn=pooled_fn,
        validation=validation,
        logger=logger,
        writes=writes,
    )


def train(cfg: TrainLoraConfig) -> Path:
    """The LoRA training loop; returns the final LoRA file (or, when a segment stops early, its state folder)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    items = load_items(cfg.manifest, cfg.latent_index, cfg.text_index, split="train", references=cfg.kontext)
    if not items:
        raise FluxpipeError(f"{cfg.manifest}: no training images (all in the validation split?)")
    tensors = CachedTensors(cfg.latent_index, cfg.text_index)
    dit = load_dit(cfg)
    clip, clip_tok, captions = None, None, []
    if cfg.clip_l is not None:
        from fluxpipe.io.tables import read_parquet
        from fluxpipe.models.text_encoders import load_clip_tokenizer

        clip = load_model(cfg.clip_l, "clip_l", dtype=cfg.compute_dtype, device=cfg.device).train()
        clip_tok = load_clip_tokenizer(cfg.clip_tokenizer, rows=clip.get_input_embeddings().num_embeddings)
        captions = read_parquet(cfg.manifest)[0].caption.tolist()
    network = FluxLoRANetwork(dit, cfg.lora, clip_l=clip, dtype=cfg.network_dtype).to(cfg.device)
    if cfg.network_weights is not None:
        network.load_kohya(load_lora_file(cfg.network_weights), strict=True)
    network.apply_to()
    dit.train()
    ema = create_ema(cfg.ema, network)
    groups = network.param_groups(
        learning_rate=cfg.learning_rate,
        unet_lr=cfg.unet_lr,
        text_encoder_lr=list(cfg.text_encoder_lr) if cfg.text_encoder_lr else None,
        loraplus_lr_ratio=cfg.lora.loraplus_lr_ratio,
        loraplus_unet_lr_ratio=cfg.lora.loraplus_unet_lr_ratio,
        loraplus_text_encoder_lr_ratio=cfg.lora.loraplus_text_encoder_lr_ratio,
        reg_lrs=cfg.lora.network_reg_lrs,
    )
    opt = build_optimizer(cfg.optimizer_type, groups, cfg.learning_rate, dict(cfg.optimizer_args))
    w = world()  # data parallel: every rank walks the global batches (per-process batch x world size)
    sizes = {k: v * w.size for k, v in cfg.batch_sizes.items()}
    first_batches = epoch_batches(items, sizes, 0, cfg.seed)
    total, epochs = plan_steps(len(first_batches), cfg)
    sched = build_scheduler(
        cfg.lr_scheduler,
        opt,
        total,
        resolve_warmup(cfg.lr_warmup_steps, total),
        cfg.lr_scheduler_num_cycles,
        cfg.lr_scheduler_power,
    )
    step, start_epoch, start_batch = 0, 0, 0
    # fp16 (on a GPU only: the CPU computes fp16 runs in bf16) scales the loss so that small gradients survive
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.compute_dtype == torch.float16 and cfg.device.startswith("cuda"))
    state = _resume_from(cfg)
    if state is not None:
        check_segment(cfg.stop_at_step, state.step)
        network.load_state_dict(state.weights)
        load_optimizer_state(opt, state.optimizer)
        sched.load_state_dict(state.scheduler)
        restore_rng(state.rng, {"noise": gen})
        step, start_epoch, start_batch = state.step, state.epoch, state.batch_in_epoch
        if scaler.is_enabled() and state.extra.get("grad_scaler"):
            scaler.load_state_dict(state.extra["grad_scaler"])
        if ema is not None:
            ema.load_state_dict(state.extra["ema"])
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    if w.main:  # what a killed run of this output left
        remove_stale_temps(cfg.output_dir, cfg.output_name)
    loss_file = cfg.output_dir / f"{cfg.output_name}-loss.jsonl"
    records: list[dict] = []
    params = [p for g in opt.param_groups for p in g["params"]]
    accum = cfg.gradient_accumulation_steps
    every_epochs = epoch_save_interval(cfg.save_every_n_epochs, cfg.save_n_epoch_ratio, epochs)
    logger = TrainLogger(
        cfg.logging_dir if w.main else None,
        cfg.log_prefix,
        window=math.ceil(len(first_batches) / accum),
        tracker_name=cfg.log_tracker_name,
    )
    pooled_fn = (lambda texts: clip_pooled(clip, clip_tok, texts, cfg.compute_dtype)) if clip is not None else None
    monitor = (
        build_monitor(cfg, dit, network, tensors, pooled_fn, captions, logger, references=cfg.kontext)
        if w.main
        else Monitor(MonitorSettings(), output_dir=cfg.output_dir, output_name=cfg.output_name, seed=cfg.seed)
    )
    if ema is not None and cfg.ema.for_eval:
        monitor.weights = ema.swapped
    monitor.at_start(step)
    model = wrap(LoraLoss(network, dit, cfg.math, pooled_fn), w)

    def save_point(suffix: str, step: int, epoch: int, batch_in_epoch: int, kind: str, every: int) -> None:
        if not w.main:  # only rank 0 writes
            return
        save_lora(network, cfg, suffix, step, epoch)
        save_beside(ema, lambda s: save_lora(network, cfg, s, step, epoch, ema_metadata(ema)), suffix)
        if cfg.save_state:
            _write_state(network, opt, sched, gen, cfg, step, epoch, batch_in_epoch, suffix, scaler, ema)
        if kind:
            prune_old(cfg, kind, step if kind == "step" else epoch, every)
        write_losses(loss_file, records, state.step if state else 0)

    bar = tqdm(
        total=total, initial=step, desc=f"train {cfg.output_name}", unit="step", mininterval=2, disable=not w.main
    )
    epoch = start_epoch
    for epoch in range(start_epoch, epochs):
        batches, e_items = epoch_batches(items, sizes, epoch, cfg.seed), epoch_captions(items, epoch)
        first = start_batch if epoch == start_epoch else 0
        for bi in range(first, len(batches)):
            boundary = not ((bi + 1 - first) % accum and bi + 1 < len(batches))  # else: accumulate
            batch = make_batch(e_items, batches[bi], tensors, gen, cfg.device, cfg.compute_dtype, cfg.prior_loss_weight)
            rows, share = w.part(len(batches[bi]))  # this rank's rows, and its loss's weight in DDP's average
            texts = [e_items[i].caption for i in batches[bi]] if clip is not None else None
            with model.no_sync() if w.size > 1 and not boundary else contextlib.nullcontext():
                loss = model(batch, gen, rows, texts)
                scaler.scale(loss * share / accum).backward()
            if not boundary:
                continue
            loss_value = float(w.mean(loss.detach(), len(rows) if rows is not None else 1))  # once a step
            scaler.unscale_(opt)  # (no-op unless fp16 on a GPU)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(opt)  # skips the step when an fp16 gradient overflowed, as accelerate does
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if ema is not None:
                ema.update(step)
            log_step(
                records, logger, bar, step, epoch, loss_value, {g["description"]: g["lr"] for g in opt.param_groups}
            )
            monitor.after_step(step, epoch)
            if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 and step < total:
                save_point(f"-step{step:08d}", step, epoch, bi + 1, "step", cfg.save_every_n_steps)
            if step >= total or step == cfg.stop_at_step:
                break
        if step == cfg.stop_at_step and step < total:  # this segment ends; the next job resumes its state
            bar.close()
            logger.close()
            if w.main:
                _write_state(network, opt, sched, gen, cfg, step, epoch, bi + 1, segment_suffix(step), scaler, ema)
                write_losses(loss_file, records, state.step if state else 0)
            tensors.close()
            w.barrier()
            return cfg.output_dir / f"{cfg.output_name}{segment_suffix(step)}-state"
        logger.epoch(epoch + 1)
        monitor.after_epoch(epoch + 1, step)
        if step >= total:
            break
        if every_epochs and (epoch + 1) % every_epochs == 0 and epoch + 1 < epochs:
            save_point(f"-{epoch + 1:06d}", step, epoch + 1, 0, "epoch", every_epochs)
    bar.close()
    logger.close()
    if w.main:
        write_losses(loss_file, records, state.step if state else 0)
        if cfg.save_state:
            _write_state(network, opt, sched, gen, cfg, step, epochs, 0, "", scaler, ema)
        save_beside(ema, lambda s: save_lora(network, cfg, s, step, min(epoch + 1, epochs), ema_metadata(ema)), "")
    final = (
        save_lora(network, cfg, "", step, min(epoch + 1, epochs))
        if w.main
        else cfg.output_dir / f"{cfg.output_name}.safetensors"
    )
    tensors.close()
    w.barrier()  # the others wait for rank 0's files
    return final


def load_lora_file(path: Path) -> dict[str, torch.Tensor]:
    """A LoRA file to continue from (--network_weights): checked as safetensors first, never unpickled."""
    from fluxpipe.io.safetensors_file import read_header, read_tensors

    header = read_header(path)
    return read_tensors(path, {k: k for k in header.tensors})
