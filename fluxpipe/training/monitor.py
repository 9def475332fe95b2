"""What a training run shows while it trains: sample images and a validation loss that can be compared.

Samples (spec §8.4): the reference's prompt files and triggers (``sample_at_first``, ``sample_every_n_steps``,
``sample_every_n_epochs`` — the epoch setting wins), written as
``<output_dir>/sample/<output_name>_<e%06d | %06d>_<index:02d>_<YYYYmmddHHMMSS>_<seed>.png``. Unlike the
reference, a prompt without ``--d`` gets the seed ``training seed + index`` (the same every time, so epochs
compare), and the noise is the official sampler's (the images reproduce in other tools). The prompts are encoded
once at the start (the text encoders are freed); a trained CLIP-L LoRA recomputes the pooled vector each time.

Validation loss (spec §8.5, made comparable): the held-out split of the manifest, each item at the fixed sigmas
``VALIDATION_SIGMAS`` with noise fixed per item (seeded by the validation seed and the item's manifest row), so
the numbers differ between epochs only because the LoRA did. Logged per epoch (and before the first step) to
``<output_name>-validation.jsonl`` and TensorBoard ``loss/validation/epoch_average``.

Both run inside ``torch.random.fork_rng``: the training's random streams are unaffected.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from fluxpipe.data.prompts import SamplePrompt
from fluxpipe.io.atomic import write_text_atomic

if TYPE_CHECKING:
    from fluxpipe.training.settings import LoopSettings

log = logging.getLogger(__name__)

VALIDATION_SIGMAS = (0.2, 0.4, 0.6, 0.8)


@dataclass(frozen=True, kw_only=True, slots=True)
class MonitorSettings:
    sample_prompts: tuple[SamplePrompt, ...] = ()
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_at_first: bool = False
    validate_every_n_epochs: int | None = 1
    validate_every_n_steps: int | None = None
    max_validation_steps: int | None = None  # at most this many validation items (all when None)
    validation_seed: int = 0
    sigmas: tuple[float, ...] = VALIDATION_SIGMAS


def _every(n: int | None, count: int) -> bool:
    return bool(n) and count % (n or 1) == 0


def sample_due(s: MonitorSettings, step: int, epoch_end: int | None) -> bool:
    """Whether to sample now: after optimizer step ``step`` (epoch_end None) or at the end of epoch
    ``epoch_end`` (1-based). sample_every_n_epochs, when set, replaces the step trigger (as the reference)."""
    if not s.sample_prompts:
        return False
    if epoch_end is not None:
        return _every(s.sample_every_n_epochs, epoch_end)
    return not s.sample_every_n_epochs and _every(s.sample_every_n_steps, step)


def validation_due(s: MonitorSettings, step: int, epoch_end: int | None) -> bool:
    if epoch_end is not None:
        return _every(s.validate_every_n_epochs, epoch_end)
    return _every(s.validate_every_n_steps, step)


def sample_name(output_name: str, step: int, epoch: int | None, index: int, seed: int, stamp: str) -> str:
    """The reference's sample file name: e%06d for epoch samples (and at first), %06d for step samples."""
    label = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    return f"{output_name}_{label}_{index:02d}_{stamp}_{seed}.png"


def fixed_noise(shape: tuple[int, ...], seed: int, row: int, k: int) -> torch.Tensor:
    """Validation noise of manifest row ``row`` at sigma number ``k``: the same in every epoch and run."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + row * 64 + k) % 2**63)
    return torch.randn(shape, generator=gen)


class Monitor:
    """Samples and validation loss of one run (a no-op when neither is configured)."""

    def __init__(
        self,
        s: MonitorSettings,
        *,
        output_dir: Path,
        output_name: str,
        seed: int,
        sampler=None,  # noqa: ANN001
        conds: dict | None = None,
        pooled_fn: Callable[[list[str]], torch.Tensor] | None = None,
        txt_fn: Callable[[list[str]], torch.Tensor] | None = None,
        validation: Callable[[], dict[str, float]] | None = None,
        logger=None,  # noqa: ANN001
        writes: bool = True,
    ) -> None:
        self.s, self.output_dir, self.output_name, self.seed = s, output_dir, output_name, seed
        self.writes = writes  # False: compute (a sharded model needs every process) but leave the files to rank 0
        self.sampler, self.conds, self.pooled_fn, self.txt_fn = sampler, conds or {}, pooled_fn, txt_fn
        self.validation, self.logger = validation, logger
        self.validation_file = output_dir / f"{output_name}-validation.jsonl"
        self.weights: Callable[[], contextlib.AbstractContextManager] = (
            contextlib.nullcontext
        )  # --ema_for_eval: a context with the EMA weights swapped in

    def at_start(self, step: int) -> None:
        if step == 0:
            if self.s.sample_at_first and self.s.sample_prompts:
                self.sample(step, epoch=0)
            if self.validation is not None:
                self.validate(step, epoch=0)

    def after_step(self, step: int, epoch: int) -> None:
        if sample_due(self.s, step, None):
            self.sample(step, None)
        if self.validation is not None and validation_due(self.s, step, None):
            self.validate(step, epoch)

    def after_epoch(self, epoch: int, step: int) -> None:
        """``epoch`` is 1-based (the number of epochs done)."""
        if sample_due(self.s, step, epoch):
            self.sample(step, epoch)
        if self.validation is not None and validation_due(self.s, step, epoch):
            self.validate(step, epoch)

    def sample(self, step: int, epoch: int | None) -> list[Path]:
        from dataclasses import replace

        from fluxpipe.inference.report_images import save_png

        stamp = time.strftime("%Y%m%d%H%M%S")
        written = []
        controlnet = self.sampler.controlnet  # (a trained ControlNet: the sampler sets it to eval mode)
        was_training = controlnet is not None and controlnet.training
        with (
            self.weights(),
            torch.random.fork_rng(devices=[self.sampler.device] if self.sampler.device.startswith("cuda") else []),
        ):
            for p in self.s.sample_prompts:
                seed = p.seed if p.seed is not None else self.seed + p.index
                cond, neg = self.conds[p.prompt], self.conds.get(p.negative_prompt) if p.cfg_scale != 1.0 else None
                if self.pooled_fn is not None:  # a trained CLIP-L LoRA: the pooled vector of the current weights
                    with torch.no_grad():
                        cond = replace(cond, vec=self.pooled_fn([p.prompt]).cpu())
                        neg = None if neg is None else replace(neg, vec=self.pooled_fn([p.negative_prompt]).cpu())
                if self.txt_fn is not None:  # a trained T5 LoRA: the T5 hidden states of the current weights
                    with torch.no_grad():
                        cond = replace(cond, txt=self.txt_fn([p.prompt]).cpu())
                        neg = None if neg is None else replace(neg, txt=self.txt_fn([p.negative_prompt]).cpu())
                image = self.sampler.image(p, cond, neg, seed)
                path = self.output_dir / "sample" / sample_name(self.output_name, step, epoch, p.index, seed, stamp)
                if self.writes:
                    written.append(save_png(image, path))
        if controlnet is not None:
            controlnet.train(was_training)
        log.info("samples at step %d: %s", step, ", ".join(p.name for p in written))
        return written

    def validate(self, step: int, epoch: int) -> float:
        assert self.validation is not None  # (validate runs only when a validation is configured)
        with self.weights(), torch.random.fork_rng(devices=[]):
            result = self.validation()
        if not self.writes:
            return result["loss"]
        record = {"step": step, "epoch": epoch, **result}
        old = self.validation_file.read_text().splitlines() if self.validation_file.is_file() else []
        kept = [line for line in old if line.strip() and json.loads(line)["step"] < step]
        write_text_atomic(self.validation_file, "".join(x + "\n" for x in [*kept, json.dumps(record)]))
        if self.logger is not None and self.logger.writer is not None:
            self.logger.writer.add_scalar("loss/validation/epoch_average", result["loss"], step)
        log.info("validation loss at step %d (epoch %d): %.5f", step, epoch, result["loss"])
        return result["loss"]


@torch.no_grad()
def validation_loss(
    model_for: Callable[[dict], torch.nn.Module],
    trained: torch.nn.Module,
    items: list,
    tensors: Any,  # noqa: ANN401 - fluxpipe.data.batches.CachedTensors
    math_settings: Any,  # noqa: ANN401 - fluxpipe.training.loss.FlowSettings
    *,
    sigmas: tuple[float, ...],
    seed: int,
    device: str,
    dtype: torch.dtype,
    limit: int | None = None,
    prepare: Callable[[dict, list], dict] | None = None,
) -> dict:
    """Mean loss over the validation items at each fixed sigma (fixed latent draw and noise per item), with the
    trained module's dropouts off; {"loss": mean, "by_sigma": {sigma: mean}}. ``model_for(batch)`` is what
    predicts (the DiT, or the DiT steered by the ControlNet); ``prepare(batch, items)`` adds what a method's
    forward needs beyond the caches (a trained CLIP-L's pooled vector, a control image)."""
    from fluxpipe.data.batches import make_batch
    from fluxpipe.training.loss import prediction_loss

    model = model_for({})
    was = model.training, trained.training
    model.eval()
    trained.eval()
    sums = [0.0] * len(sigmas)
    chosen = items[:limit] if limit else items
    try:
        for i, item in enumerate(chosen):
            batch = make_batch(chosen, [i], tensors, torch.Generator().manual_seed(seed + item.row), device, dtype)
            if prepare is not None:
                batch = prepare(batch, chosen)
            for k, sigma in enumerate(sigmas):
                noise = fixed_noise(tuple(batch["latents"].shape), seed, item.row, k).to(device, dtype)
                t = torch.full((1,), sigma, device=device)
                sums[k] += float(prediction_loss(model_for(batch), batch, math_settings, t, noise)[0])
    finally:
        model.train(was[0])
        trained.train(was[1])
    by_sigma = {str(s): v / len(chosen) for s, v in zip(sigmas, sums, strict=True)}
    return {"loss": sum(by_sigma.values()) / len(sigmas), "by_sigma": by_sigma, "items": len(chosen)}


def build_monitor(
    s: LoopSettings,
    dit: torch.nn.Module,
    trained: torch.nn.Module,
    tensors: Any,  # noqa: ANN401 - fluxpipe.data.batches.CachedTensors
    logger: Any,  # noqa: ANN401 - fluxpipe.training.log.TrainLogger
    *,
    dtype: torch.dtype,
    writes: bool = True,
    pooled_fn: Callable[[list[str]], torch.Tensor] | None = None,
    txt_fn: Callable[[list[str]], torch.Tensor] | None = None,
    model_for: Callable[[dict], torch.nn.Module] | None = None,
    prepare: Callable[[dict, list], dict] | None = None,
    controlnet: torch.nn.Module | None = None,
) -> Monitor:
    """Samples (prompts encoded now, encoders freed; the AE kept for decoding; ``controlnet`` steers prompts with
    a control image) and the validation loss, the DiT computing in ``dtype``."""
    from fluxpipe.data.batches import load_items

    m = s.monitor
    sampler, conds = _sampler(s, dit, dtype, controlnet) if m.sample_prompts else (None, {})
    items = load_items(s.manifest, s.latent_index, s.text_index, split="val", references=s.references)
    validation = None
    if items and (m.validate_every_n_epochs or m.validate_every_n_steps):

        def validation() -> dict:
            return validation_loss(
                model_for or (lambda batch: dit),
                trained,
                items,
                tensors,
                s.math,
                sigmas=m.sigmas,
                seed=m.validation_seed,
                device=s.device,
                dtype=dtype,
                limit=m.max_validation_steps,
                prepare=prepare,
            )

    return Monitor(
        m,
        output_dir=s.output_dir,
        output_name=s.output_name,
        seed=s.seed,
        sampler=sampler,
        conds=conds,
        pooled_fn=pooled_fn,
        txt_fn=txt_fn,
        validation=validation,
        logger=logger,
        writes=writes,
    )


def _sampler(s: LoopSettings, dit: torch.nn.Module, dtype: torch.dtype, controlnet: torch.nn.Module | None) -> tuple:
    """The samples' sampler and their prompts' encodings (the text encoders freed after)."""
    from fluxpipe.errors import FluxpipeError
    from fluxpipe.inference.sampler import Sampler, encode_texts
    from fluxpipe.io.checkpoints import load_ae
    from fluxpipe.models.controlnet import ControlNetFlux
    from fluxpipe.models.flux import Flux
    from fluxpipe.parallel.devices import encode_dtype

    m = s.monitor
    if s.sample_models is None:
        raise FluxpipeError("--sample_prompts needs the model files of --ae, --clip_l and --t5xxl")
    texts = [p.prompt for p in m.sample_prompts] + [p.negative_prompt for p in m.sample_prompts]
    conds = encode_texts(
        s.sample_models,
        texts,
        device=s.device,
        dtype=encode_dtype(s.device),
        max_length=s.t5_max_length,
        apply_t5_attn_mask=s.math.apply_t5_attn_mask,
    )
    ae = load_ae(s.sample_models.ae, dtype=encode_dtype(s.device), device=s.device)
    sampler = Sampler(
        cast(Flux, dit),  # (the trained DiT, or a ControlledFlux's base: the same forward)
        ae,
        device=s.device,
        dtype=dtype,
        apply_t5_attn_mask=s.math.apply_t5_attn_mask,
        controlnet=cast(ControlNetFlux | None, controlnet),
    )
    return sampler, conds
