"""ControlNet training stage (`fluxpipe train controlnet`, rule ``train_controlnet``).

Input: the frozen base DiT (``--blocks_to_swap`` and ``--fp8_base`` allowed for it), a ControlNet-Flux
(``fluxpipe.models.controlnet``: fresh, with its zero-initialised hint output and residual projections, or
``--controlnet_model_name_or_path``, loaded strictly), the caches, and each training image's conditioning image
from the manifest (resized and centre-cropped with its target, mirrored with it; ``fluxpipe.data.conditioning``).
The ControlNet's residuals are added to the base model's image stream after every double block; the loss is
the LoRA trainer's flow-matching loss (l2 or l1: the reference passes no Huber threshold here). Output: the
ControlNet's weights in the reference's key layout (``<name>.safetensors`` and per-epoch / per-step files),
``<name>-loss.jsonl``, ``-state`` folders that resume exactly; samples (prompts with ``--cn`` control
images) and the validation loss (each held-out image with its conditioning image) as the other methods.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fluxpipe.data.batches import refuse_preservation
from fluxpipe.errors import FluxpipeError
from fluxpipe.models.controlnet import ControlledFlux, ControlNetFlux, load_controlnet_state
from fluxpipe.parallel.distributed import World, world, wrap
from fluxpipe.training.configs import TrainControlNetConfig, check_parallel
from fluxpipe.training.dit import load_dit
from fluxpipe.training.ema import create as create_ema
from fluxpipe.training.engine import Method, TrainData, ddp_sync, load_data, train_loop
from fluxpipe.training.loss import FlowSettings, draw_flow_noise, prediction_loss, select_rows
from fluxpipe.training.monitor import build_monitor
from fluxpipe.training.settings import LoopSettings
from fluxpipe.training.weights import Optimizers, WeightOptimizers, modelspec, save_weights

__all__ = ["TrainControlNetConfig", "run", "train"]
log = logging.getLogger(__name__)


def build_controlnet(cfg: TrainControlNetConfig, params) -> ControlNetFlux:  # noqa: ANN001 - FluxParams
    torch.manual_seed(cfg.seed)  # a fresh ControlNet's initial weights follow the seed
    controlnet = ControlNetFlux(params)
    if cfg.controlnet is not None:
        from fluxpipe.io.safetensors_file import read_header, read_tensors

        header = read_header(cfg.controlnet)
        load_controlnet_state(controlnet, read_tensors(cfg.controlnet, {k: k for k in header.tensors}))
    controlnet.gradient_checkpointing = cfg.gradient_checkpointing
    dtype = torch.bfloat16 if cfg.full_bf16 else torch.float32
    return controlnet.to(cfg.device, dtype).requires_grad_(True).train()


def conditioning_rows(cfg: TrainControlNetConfig, items: list) -> list[dict]:
    """Manifest rows of the training items, each with its conditioning image (else one error)."""
    from fluxpipe.io.tables import read_parquet

    rows = read_parquet(cfg.manifest)[0].to_dict("records")
    missing = [str(rows[it.row]["path"]) for it in items if not rows[it.row].get("conditioning")]
    if missing:
        raise FluxpipeError(
            f"{cfg.manifest}: {len(missing)} training images have no conditioning image (e.g. "
            f"{missing[0]}); ControlNet training needs conditioning_data_dir in every subset of the "
            "dataset TOML"
        )
    return rows


def hints(rows: list[dict], items: list, batch: dict, images, device: str) -> Tensor:  # noqa: ANN001
    """[B, 3, H, W] control images of a batch, mirrored where the batch drew a flipped latent."""
    flipped = batch["flipped"].tolist()
    return torch.stack(
        [images.get(rows[items[i].row], flip=f) for i, f in zip(batch["indices"], flipped, strict=True)]
    ).to(device)


def save_controlnet(
    controlnet: ControlNetFlux,
    cfg: TrainControlNetConfig,
    suffix: str,
    step: int,
    epoch: int,
    extra: dict[str, str] | None = None,
) -> Path:
    meta = {
        **modelspec(f"flux-1-{cfg.variant}/controlnet", cfg.output_name),
        "ss_steps": str(step),
        "ss_epoch": str(epoch),
        "fluxpipe_settings": cfg.settings,
        **(extra or {}),
    }
    path = save_weights(controlnet, cfg.output_dir / f"{cfg.output_name}{suffix}.safetensors", meta, cfg.save_precision)
    log.info("saved %s (step %d, epoch %d)", path, step, epoch)
    return path


class ControlNetLoss(torch.nn.Module):
    """One rank's loss of a batch, as a module whose only parameters are the ControlNet's (what DDP wraps; the
    frozen base model is not registered)."""

    def __init__(self, controlnet: ControlNetFlux, dit: torch.nn.Module, m: FlowSettings) -> None:
        super().__init__()
        self.controlnet, self.dit, self.m = controlnet, [dit], m

    def forward(self, batch: dict, gen: torch.Generator, rows: list[int] | None) -> Tensor:
        draws = draw_flow_noise(batch, self.m, gen)  # every rank draws for the whole batch, in the same order
        if rows == []:  # a short batch left this rank nothing: a zero loss that still reaches every parameter
            return torch.stack([p.sum() for p in self.controlnet.parameters()]).sum() * 0.0
        if rows is not None:
            batch, draws = select_rows(batch, draws, rows)
        model = ControlledFlux(self.dit[0], self.controlnet, batch["hint"])
        return prediction_loss(model, batch, self.m, *draws).mean()


class Autocast(torch.nn.Module):
    """A module called under the training's autocast (the ControlNet's fp32 weights meet the base's dtype)."""

    def __init__(self, module: torch.nn.Module, device: str, dtype: torch.dtype, enabled: bool) -> None:
        super().__init__()
        self.module, self.device_type, self.dtype, self.enabled = module, torch.device(device).type, dtype, enabled

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled):
            return self.module(*args, **kwargs)


def restore(controlnet: ControlNetFlux, optim: Optimizers, state: Any) -> None:  # noqa: ANN401 - TrainState
    controlnet.load_state_dict(state.weights)
    optim.load_state_dict(state.optimizer)


def controlnet_method(cfg: TrainControlNetConfig, s: LoopSettings, d: TrainData, w: World) -> Method:
    from fluxpipe.data.conditioning import ConditioningImages

    rows_table, images = conditioning_rows(cfg, d.items), ConditioningImages()
    dit = load_dit(cfg).train()  # frozen, but in training mode: its blocks are checkpointed when asked
    controlnet = build_controlnet(cfg, dit.params)
    optim = WeightOptimizers(controlnet, cfg.optim, d.total)
    ema = create_ema(cfg.ema, controlnet)
    model = wrap(ControlNetLoss(controlnet, dit, cfg.math), w)
    mixed = cfg.compute_dtype != torch.float32 and not cfg.full_bf16
    steered = Autocast(controlnet, cfg.device, cfg.compute_dtype, mixed)

    def loss(batch: dict, gen: torch.Generator, rows: list[int] | None, indices: list[int]) -> Tensor:
        batch["hint"] = hints(rows_table, d.items, batch, images, cfg.device)
        with torch.autocast(torch.device(cfg.device).type, dtype=cfg.compute_dtype, enabled=mixed):
            return model(batch, gen, rows)

    def prepare(batch: dict, items: list) -> dict:  # a validation image's conditioning image
        return {**batch, "hint": hints(rows_table, items, batch, images, cfg.device)}

    def monitor(logger: Any, writes: bool) -> Any:  # noqa: ANN401
        return build_monitor(
            s,
            dit,
            controlnet,
            d.tensors,
            logger,
            dtype=cfg.compute_dtype,
            writes=writes,
            model_for=lambda batch: ControlledFlux(dit, steered, batch.get("hint", torch.empty(0))),  # type: ignore[arg-type]
            prepare=prepare,
            controlnet=steered,
        )

    return Method(
        optim=optim,
        loss=loss,
        save=lambda suffix, step, epoch, extra: save_controlnet(controlnet, cfg, suffix, step, epoch, extra),
        capture=lambda: (dict(controlnet.state_dict()), optim.state_dict(), {}),
        restore=lambda state: restore(controlnet, optim, state),
        monitor=monitor,
        batch_dtype=cfg.compute_dtype,
        sync=ddp_sync(model, w),
        ema=ema,
    )


def run(cfg: TrainControlNetConfig) -> Path:
    """Train the ControlNet (DDP across torchrun's processes); returns the final ControlNet file, or, when a
    segment stops early, its state folder."""
    w = world()  # data parallel: every rank walks the global batches (per-process batch x world size)
    check_parallel(cfg, w, sharded=False)
    s = LoopSettings.of(cfg)
    d = load_data(s, w)
    refuse_preservation(d.items, "ControlNet trainer")
    method = controlnet_method(cfg, s, d, w)
    torch.manual_seed(cfg.seed)
    return train_loop(s, method, d)


train = run
