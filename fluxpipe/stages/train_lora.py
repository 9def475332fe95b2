"""LoRA training stage: the DiT learns a kohya-layout LoRA from the cached latents and text outputs.

Input: the strict-loaded DiT, the manifest and both cache indexes. Output: ``<output_dir>/<name>.safetensors``
(plus per-epoch / per-step files and ``-state`` folders when asked) in the kohya/ComfyUI layout with ss_* and
modelspec metadata, and ``<name>-loss.jsonl``. The loop is the shared one (fluxpipe.training.engine); this
method contributes the LoRA network (and a trained CLIP-L's), its loss module and its file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fluxpipe.io.checkpoints import load_model
from fluxpipe.lora.files import load_lora_file, save_lora
from fluxpipe.lora.lycoris import LycorisFluxNetwork
from fluxpipe.lora.network import FluxLoRANetwork
from fluxpipe.parallel.distributed import World, world, wrap
from fluxpipe.training.configs import TrainLoraConfig
from fluxpipe.training.dit import load_dit
from fluxpipe.training.ema import create as create_ema
from fluxpipe.training.engine import Method, TrainData, ddp_sync, load_data, train_loop
from fluxpipe.training.loss import FlowSettings, draw_flow_noise, flow_loss
from fluxpipe.training.metadata import run_figures
from fluxpipe.training.monitor import build_monitor
from fluxpipe.training.optim import build_optimizer, build_scheduler, load_optimizer_state, resolve_warmup
from fluxpipe.training.settings import LoopSettings
from fluxpipe.training.state import TrainState
from fluxpipe.training.weights import Optimizers

__all__ = ["TrainLoraConfig", "run", "train"]
log = logging.getLogger(__name__)
PooledFn = Callable[[list[str]], torch.Tensor]
T5Fn = Callable[[list[str]], dict[str, torch.Tensor]]  # captions -> {"t5", "t5_mask"} through a trained T5 LoRA
Network = FluxLoRANetwork | LycorisFluxNetwork  # what the loop trains (--network_module)


class LoraLoss(torch.nn.Module):
    """One rank's loss of a batch, as a module whose only parameters are the LoRA's (what DDP wraps)."""

    def __init__(
        self,
        network: Network,
        dit: torch.nn.Module,
        m: FlowSettings,
        pooled_fn: PooledFn | None = None,
        t5_fn: T5Fn | None = None,
    ) -> None:
        super().__init__()
        self.network, self.dit, self.m = network, [dit], m  # (the DiT is not registered)
        self.pooled_fn, self.t5_fn = pooled_fn, t5_fn

    def forward(
        self, batch: dict, gen: torch.Generator, rows: list[int] | None, captions: list[str] | None
    ) -> torch.Tensor:
        if self.pooled_fn is not None:  # a trained CLIP-L LoRA: its pooled vector, inside DDP's forward
            batch = {**batch, "pooled": self.pooled_fn(captions or [])}
        if self.t5_fn is not None:  # a trained T5 LoRA: T5's hidden states with gradients, inside DDP's forward
            batch = {**batch, **self.t5_fn(captions or [])}
        if rows == []:  # a short batch left this rank nothing: a zero loss that still reaches every parameter
            draw_flow_noise(batch, self.m, gen)  # the same draws as the other ranks, no forward pass
            return torch.stack([p.sum() for p in self.network.parameters()]).sum() * 0.0
        return flow_loss(self.dit[0], batch, self.m, gen, rows=rows, network=self.network)


def trained_clip(cfg: TrainLoraConfig) -> tuple[torch.nn.Module | None, PooledFn | None]:
    """With --clip_l (not --network_train_unet_only): the CLIP-L whose LoRA trains too and its pooled-vector
    function."""
    if cfg.clip_l is None:
        return None, None
    from fluxpipe.data.text_encoding import clip_pooled
    from fluxpipe.models.text_encoders import load_clip_tokenizer

    clip: Any = load_model(cfg.clip_l, "clip_l", dtype=cfg.compute_dtype, device=cfg.device).train()
    tokenizer = load_clip_tokenizer(cfg.clip_tokenizer, rows=clip.get_input_embeddings().num_embeddings)
    return clip, (lambda texts: clip_pooled(clip, tokenizer, texts).to(cfg.compute_dtype))


def trained_t5(cfg: TrainLoraConfig, d: TrainData) -> tuple[torch.nn.Module | None, T5Fn | None]:
    """With --network_args train_t5xxl=True (uncached text, checked by the command): the uncached text's T5,
    which then runs inside the loss with gradients to its LoRA, and its hidden-states function."""
    enc = d.encoders
    if cfg.lycoris is not None or not cfg.lora.train_t5xxl or enc is None:
        return None, None
    enc.t5_in_loss = True
    if cfg.gradient_checkpointing:  # as the reference does for a trained text encoder (T5's dropout is 0 here)
        t5: Any = enc.t5.train()
        if hasattr(t5, "activation_checkpointing_enable"):  # (transformers' name from late 5.x on)
            t5.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            t5.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return enc.t5, (lambda texts: enc.encode_t5(texts, cfg.device, cfg.compute_dtype))


def manifest_captions(cfg: TrainLoraConfig) -> list[str]:
    from fluxpipe.io.tables import read_parquet

    captions: list[str] = read_parquet(cfg.manifest)[0].caption.tolist()
    return captions


def build_network(
    cfg: TrainLoraConfig, dit: torch.nn.Module, clip: torch.nn.Module | None, t5: torch.nn.Module | None = None
) -> Network:
    """What this method trains: the LoRA of the DiT (and of CLIP-L, and of T5 with train_t5xxl), applied to the
    frozen models; or a LyCORIS network of the DiT through its package (--network_module lycoris.kohya)."""
    network: Network
    if cfg.lycoris is not None:
        lora = cfg.lora
        network = LycorisFluxNetwork(
            dit, cfg.lycoris, lora.network_dim, lora.network_alpha, lora.dropout, cfg.network_dtype
        )
    else:
        network = FluxLoRANetwork(dit, cfg.lora, clip_l=clip, t5xxl=t5, dtype=cfg.network_dtype)
    network = network.to(cfg.device)
    if cfg.network_weights is not None:
        network.load_kohya(load_lora_file(cfg.network_weights), strict=True)
    network.apply_to()
    return network


def lora_optimizers(cfg: TrainLoraConfig, network: Network, total: int) -> Optimizers:
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
    warmup = resolve_warmup(cfg.lr_warmup_steps, total)
    sched = build_scheduler(
        cfg.lr_scheduler,
        opt,
        total,
        warmup,
        cfg.lr_scheduler_num_cycles,
        cfg.lr_scheduler_power,
        scheduler_type=cfg.lr_scheduler_type,
        scheduler_args=dict(cfg.lr_scheduler_args),
    )
    params = [p for g in opt.param_groups for p in g["params"]]
    return Optimizers({"main": opt}, {"main": sched}, params, cfg.max_grad_norm, group_lrs=True)


def lora_saver(cfg: TrainLoraConfig, network: Network, meta: dict[str, str]) -> Callable[..., Path]:
    def save(suffix: str, step: int, epoch: int, extra: dict[str, str] | None) -> Path:
        path = cfg.output_dir / f"{cfg.output_name}{suffix}.safetensors"
        metadata = {
            **meta,
            "ss_steps": str(step),
            "ss_epoch": str(epoch),
            "ss_training_finished_at": str(int(time.time())),
            **(extra or {}),
        }
        save_lora(network.state_dict_kohya(cfg.save_precision), path, metadata)
        log.info("saved %s (step %d, epoch %d)", path, step, epoch)
        return path

    return save


def lora_method(cfg: TrainLoraConfig, s: LoopSettings, d: TrainData, w: World) -> Method:
    dit = load_dit(cfg)
    (clip, pooled_fn), (t5, t5_fn) = trained_clip(cfg), trained_t5(cfg, d)
    captions = manifest_captions(cfg) if pooled_fn or t5_fn else []  # (the validation's, for a trained encoder)
    network = build_network(cfg, dit, clip, t5)
    dit.train()
    ema = create_ema(cfg.ema, network)
    optim = lora_optimizers(cfg, network, d.total)
    opt, sched = optim.optimizers["main"], optim.schedulers["main"]
    model = wrap(LoraLoss(network, dit, cfg.math, pooled_fn, t5_fn), w)

    def loss(batch: dict, gen: torch.Generator, rows: list[int] | None, indices: list[int]) -> torch.Tensor:
        texts = batch["captions"] if pooled_fn or t5_fn else None  # (this epoch's / this step's captions)
        out: torch.Tensor = model(batch, gen, rows, texts)
        return out

    def restore(state: TrainState) -> None:
        network.load_state_dict(state.weights)
        load_optimizer_state(opt, state.optimizer)
        sched.load_state_dict(state.scheduler)

    def prepare(batch: dict, items: list) -> dict:  # the validation's encodings of a trained CLIP-L / T5
        if pooled_fn is None and t5_fn is None:
            return batch
        texts = [captions[items[i].row] for i in batch["indices"]]
        if pooled_fn is not None:
            batch = {**batch, "pooled": pooled_fn(texts).to(cfg.compute_dtype)}
        return batch if t5_fn is None else {**batch, **t5_fn(texts)}

    def monitor(logger: Any, writes: bool) -> Any:  # noqa: ANN401
        return build_monitor(
            s,
            dit,
            network,
            d.tensors,
            logger,
            dtype=cfg.compute_dtype,
            writes=writes,
            pooled_fn=pooled_fn,
            txt_fn=None if t5_fn is None else (lambda texts: t5_fn(texts)["t5"]),
            prepare=prepare,
        )

    return Method(
        optim=optim,
        loss=loss,
        save=lora_saver(cfg, network, {**cfg.metadata, **run_figures(d.batches, d.total, d.epochs)}),
        capture=lambda: (
            {k: v.detach().clone() for k, v in network.state_dict().items()},
            opt.state_dict(),
            sched.state_dict(),
        ),
        restore=restore,
        monitor=monitor,
        batch_dtype=cfg.compute_dtype,
        sync=ddp_sync(model, w),
        ema=ema,
    )


def run(cfg: TrainLoraConfig) -> Path:
    """Train the LoRA; returns the final LoRA file (or, when a segment stops early, its state folder)."""
    torch.manual_seed(cfg.seed)
    w = world()  # data parallel: every rank walks the global batches (per-process batch x world size)
    s = LoopSettings.of(cfg, settings=cfg.metadata.get("fluxpipe_settings"), references=cfg.kontext)
    d = load_data(s, w)
    return train_loop(s, lora_method(cfg, s, d, w), d)


train = run
