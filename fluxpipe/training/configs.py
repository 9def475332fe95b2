"""The typed configs of the three training methods (built by fluxpipe.commands.train from the reference's
flags) and the checks of what data-parallel training cannot do. The shared loop reads its part of them as
``fluxpipe.training.settings.LoopSettings``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from fluxpipe.errors import FluxpipeError
from fluxpipe.inference.sampler import ModelFiles
from fluxpipe.lora.network import LoraSpec
from fluxpipe.parallel.distributed import World
from fluxpipe.training.ema import EmaSettings
from fluxpipe.training.live_latents import LiveLatents
from fluxpipe.training.live_text import LiveText
from fluxpipe.training.loss import FlowSettings
from fluxpipe.training.monitor import MonitorSettings
from fluxpipe.training.optim import canonical_optimizer
from fluxpipe.training.weights import OptimizerSettings

FSDP_OPTIMIZERS = ("AdamW", "SGDNesterov")  # torch.optim's: they step DTensor shards


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
    lr_scheduler_type: str = ""  # a scheduler class (module.Class or a torch.optim.lr_scheduler name)
    lr_scheduler_args: dict = field(default_factory=dict)
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
    live_text: LiveText | None = None  # uncached text (no --cache_text_encoder_outputs): encoded each step
    live_latents: LiveLatents | None = None  # uncached latents: random_crop / color_aug subsets encoded each step
    ema: EmaSettings | None = (
        None  # --ema_decay: an EMA of the LoRA, saved as <name>-ema.safetensors (fluxpipe.training.ema)
    )
    lycoris: dict[str, str] | None = None  # --network_module lycoris.kohya: its --network_args (fluxpipe.lora.lycoris)
    prior_loss_weight: float = 1.0  # loss weight of the regularisation (is_reg) images
    model_type: str = "flux"  # --model_type: which DiT the file is (chroma: fluxpipe.models.chroma)
    kontext: bool = False  # --model_type kontext: every item trains with its cached reference latent


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainFullConfig:
    flux: Path
    manifest: Path
    latent_index: Path
    text_index: Path
    output_dir: Path
    output_name: str
    batch_sizes: dict[int, int]
    variant: str  # "dev" / "schnell": the saved file's ModelSpec architecture
    math: FlowSettings = field(default_factory=FlowSettings)
    optim: OptimizerSettings = field(default_factory=OptimizerSettings)
    max_train_steps: int = 1600
    max_train_epochs: int | None = None
    gradient_accumulation_steps: int = 1
    compute_dtype: torch.dtype = torch.float32  # autocast dtype (bf16/fp16) or fp32
    full_bf16: bool = False  # the weights themselves in bf16 (fused Adafactor rounds stochastically)
    seed: int = 42
    gradient_checkpointing: bool = False
    cpu_offload_checkpointing: bool = False
    blocks_to_swap: int = 0
    save_every_n_epochs: int | None = None
    save_every_n_steps: int | None = None
    save_n_epoch_ratio: int | None = None
    save_precision: torch.dtype | None = None
    save_state: bool = False
    save_last_n_epochs: int | None = None
    save_last_n_epochs_state: int | None = None
    save_last_n_steps: int | None = None
    save_last_n_steps_state: int | None = None
    resume: Path | None = None
    auto_resume: bool = False
    device: str = "cpu"
    settings: str = ""  # digest of the settings and data: a state resumes only a run with the same one
    logging_dir: Path | None = None
    log_prefix: str = ""
    log_tracker_name: str = ""  # a subfolder of the run folder for the event files ("": none)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)  # samples and validation loss
    sample_models: ModelFiles | None = None
    t5_max_length: int = 512
    stop_at_step: int | None = None  # end this job (one segment of a chained run) at this step, state written
    live_text: LiveText | None = None  # uncached text (no --cache_text_encoder_outputs): encoded each step
    live_latents: LiveLatents | None = None  # uncached latents: random_crop / color_aug subsets encoded each step
    ema: EmaSettings | None = (
        None  # --ema_decay: an EMA of the trained weights, <name>-ema.safetensors (fluxpipe.training.ema)
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainControlNetConfig(TrainFullConfig):
    """The full fine-tune's settings (they apply to the ControlNet's weights here; blocks_to_swap to the base)
    plus the frozen base model's options and the starting ControlNet."""

    controlnet: Path | None = None  # start from this ControlNet (strict), else fresh
    fp8_base: bool = False
    torch_compile: bool = False
    dynamo_backend: str = "inductor"


def check_parallel(cfg: TrainFullConfig, w: World, sharded: bool) -> None:
    """Refuse, before any work, what data-parallel (torchrun) training cannot do."""
    if w.size == 1:
        return
    o = cfg.optim
    if o.fused_backward_pass or o.blockwise_fused_optimizers:
        raise FluxpipeError(
            "--fused_backward_pass / --blockwise_fused_optimizers update each weight from this "
            "process's gradient before the processes average theirs: run them in one process, or "
            "drop the flag under torchrun"
        )
    if sharded and (cfg.blocks_to_swap or cfg.cpu_offload_checkpointing):
        raise FluxpipeError(
            "--blocks_to_swap / --cpu_offload_checkpointing: under torchrun the full fine-tune "
            "shards the weights across the GPUs (FSDP2) instead; drop the flag"
        )
    if sharded and cfg.ema is not None:
        raise FluxpipeError(
            "--ema_decay: the EMA of FSDP-sharded weights is not implemented; train the full "
            "fine-tune with an EMA in one process (--ema_on_cpu keeps it in host memory)"
        )
    if sharded and canonical_optimizer(o.optimizer_type) not in FSDP_OPTIMIZERS:
        raise FluxpipeError(
            f"--optimizer_type {o.optimizer_type}: it cannot step FSDP-sharded weights; under "
            f"torchrun use one of {', '.join(FSDP_OPTIMIZERS)} (or train in one process)"
        )
