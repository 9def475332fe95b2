"""The settings the shared training loop reads (``fluxpipe.training.engine``): the data, the step plan, the
saving, resuming, logging and monitoring flags. Every method's stage config carries them under the same names;
``LoopSettings.of`` picks them out, so no method's config travels below its stage."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from fluxpipe.inference.sampler import ModelFiles
from fluxpipe.training.ema import EmaSettings
from fluxpipe.training.live_latents import LiveLatents
from fluxpipe.training.live_text import LiveText
from fluxpipe.training.loss import FlowSettings
from fluxpipe.training.monitor import MonitorSettings


@dataclass(frozen=True, kw_only=True, slots=True)
class LoopSettings:
    manifest: Path
    latent_index: Path
    text_index: Path
    output_dir: Path
    output_name: str
    batch_sizes: dict[int, int]
    settings: str | None = None  # digest of the settings and data: a state resumes only a run with the same one
    math: FlowSettings = field(default_factory=FlowSettings)
    max_train_steps: int = 1600
    max_train_epochs: int | None = None
    gradient_accumulation_steps: int = 1
    compute_dtype: torch.dtype = torch.float32
    seed: int = 42
    save_every_n_epochs: int | None = None
    save_every_n_steps: int | None = None
    save_n_epoch_ratio: int | None = None
    save_state: bool = False
    save_last_n_epochs: int | None = None  # keep only the newest n per-epoch files (and states)
    save_last_n_epochs_state: int | None = None
    save_last_n_steps: int | None = None  # keep only the per-step files of the last n steps
    save_last_n_steps_state: int | None = None
    resume: Path | None = None
    auto_resume: bool = False
    device: str = "cpu"
    logging_dir: Path | None = None
    log_prefix: str = ""
    log_tracker_name: str = ""  # a subfolder of the run folder for the event files ("": none)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)  # samples and validation loss
    sample_models: ModelFiles | None = None  # AE and text encoders for the samples' prompts
    t5_max_length: int = 512
    stop_at_step: int | None = None  # end this job (one segment of a chained run) at this step, state written
    ema: EmaSettings | None = None
    prior_loss_weight: float = 1.0  # the loss weight of regularisation (is_reg) images
    references: bool = False  # Kontext: every item trains with its cached reference latent
    live_text: LiveText | None = None  # uncached text: the captions are augmented and encoded each step
    live_latents: LiveLatents | None = None  # uncached latents: random_crop / color_aug subsets encoded each step

    @classmethod
    def of(cls, cfg: Any, **given: Any) -> LoopSettings:  # noqa: ANN401 - any stage config
        """The loop's settings out of a stage config (its fields of the same names), ``given`` overriding."""
        names = [f.name for f in fields(cls) if f.name not in given and hasattr(cfg, f.name)]
        return cls(**{n: getattr(cfg, n) for n in names}, **given)
