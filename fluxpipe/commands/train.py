"""From the reference trainer's flags to fluxpipe's typed LoRA training config (and the caches it reads).

``fluxpipe train lora <flags>`` parses the flags (fluxpipe.config.reference_flags), makes sure the manifest and both
caches exist (the pipeline's, given by ``--cache_dir``, or built in ``<output_dir>/.fluxpipe-cache`` with
the same stage code), and builds a ``TrainLoraConfig``. Features not built yet fail or warn here, loudly.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any
from pathlib import Path

import torch

from fluxpipe.commands.model_types import dit_variant
from fluxpipe.errors import FluxpipeError
from fluxpipe.inference.sampler import ModelFiles
from fluxpipe.lora.lycoris import network_kwargs
from fluxpipe.lora.network import LoraSpec, parse_network_args
from fluxpipe.training.configs import TrainControlNetConfig, TrainFullConfig, TrainLoraConfig
from fluxpipe.training.ema import EmaSettings
from fluxpipe.training.loss import FlowSettings
from fluxpipe.training.optim import parse_optimizer_args

from fluxpipe.data.text_encoding import default_t5_max_length
from fluxpipe.training.monitor import MonitorSettings

from fluxpipe.commands.train_caches import (
    CachePaths,
    build_caches,
    check_pipeline_dataset,
    live_latents,
    live_text,
    load_datasets,
    pipeline_caches,
    with_cli_validation,
)
from fluxpipe.commands.train_meta import data_digest, settings_digest, training_metadata
from fluxpipe.commands.train_flags import (  # re-exported: the flag checks live beside this module
    HONOURED,
    HONOURED_CONTROLNET,
    HONOURED_FULL,
    SPECIAL,
    check_kontext,
    check_controlnet_crops,
    check_kontext_pairs,
    check_supported,
    check_unhonoured,
)

__all__ = [
    "CachePaths",
    "build_caches",
    "check_pipeline_dataset",
    "data_digest",
    "load_datasets",
    "pipeline_caches",
    "settings_digest",
    "training_metadata",
    "with_cli_validation",
    "HONOURED",
    "HONOURED_CONTROLNET",
    "HONOURED_FULL",
    "SPECIAL",
    "check_kontext",
    "check_controlnet_crops",
    "check_kontext_pairs",
    "check_supported",
    "check_unhonoured",
]


log = logging.getLogger(__name__)
DTYPES = {None: None, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def compute_dtype(mixed_precision: str, device: str) -> torch.dtype:
    """Base-model dtype: fp32 for 'no'; bf16 / fp16 on a GPU; on the CPU fp16 falls back to bf16 (fp16 matmuls
    are unusably slow there)."""
    if mixed_precision == "no":
        return torch.float32
    if mixed_precision == "fp16" and not device.startswith("cuda"):
        log.warning("--mixed_precision fp16 on the CPU: computing in bf16 instead (fp16 matmuls are unusably slow)")
        return torch.bfloat16
    return torch.float16 if mixed_precision == "fp16" else torch.bfloat16


def lora_spec(ns: argparse.Namespace) -> LoraSpec:
    if ns.network_module == "lycoris.kohya":  # its --network_args go to the LyCORIS package (TrainLoraConfig.lycoris)
        return LoraSpec(network_dim=ns.network_dim or 4, network_alpha=ns.network_alpha, dropout=ns.network_dropout)
    try:
        extra = parse_network_args(list(ns.network_args or []))
        spec = LoraSpec(
            network_dim=ns.network_dim or 4, network_alpha=ns.network_alpha, dropout=ns.network_dropout, **extra
        )
    except ValueError as e:
        raise FluxpipeError(f"--network_args: {e}") from e
    if spec.train_t5xxl and ns.cache_text_encoder_outputs:
        raise FluxpipeError(
            "--network_args train_t5xxl=True with --cache_text_encoder_outputs: a T5 LoRA needs T5 to run every "
            "step; turn off cache_text_encoder_outputs (the reference refuses this too)"
        )
    if spec.train_t5xxl and ns.network_train_unet_only:
        raise FluxpipeError(
            "--network_args train_t5xxl=True with --network_train_unet_only: the reference then drops the T5 "
            "LoRA modules and trains no T5 LoRA; drop one of the two"
        )
    return spec


def flow_settings(ns: argparse.Namespace) -> FlowSettings:
    """The training-maths flags (spec §4)."""
    return FlowSettings(
        timestep_sampling=ns.timestep_sampling,
        sigmoid_scale=ns.sigmoid_scale,
        discrete_flow_shift=ns.discrete_flow_shift,
        weighting_scheme=ns.weighting_scheme,
        logit_mean=ns.logit_mean,
        logit_std=ns.logit_std,
        mode_scale=ns.mode_scale,
        model_prediction_type=ns.model_prediction_type,
        guidance_scale=ns.guidance_scale,
        loss_type=ns.loss_type,
        huber_schedule=ns.huber_schedule if ns.loss_type in ("huber", "smooth_l1") else "constant",
        huber_c=ns.huber_c,
        huber_scale=ns.huber_scale,
        ip_noise_gamma=ns.ip_noise_gamma,
        ip_noise_gamma_random_strength=ns.ip_noise_gamma_random_strength,
        apply_t5_attn_mask=ns.apply_t5_attn_mask,
    )


def sample_models(ns: argparse.Namespace, clip_tokenizer: Path | None, t5_tokenizer: Path | None) -> ModelFiles | None:
    """The model files samples need (the text encoders for the prompts, the AE for decoding)."""
    if not (ns.ae and (ns.clip_l or ns.model_type == "chroma") and ns.t5xxl):
        return None
    return ModelFiles(
        flux=Path(ns.pretrained_model_name_or_path),
        ae=Path(ns.ae),
        clip_l=Path(ns.clip_l) if ns.clip_l else None,
        t5xxl=Path(ns.t5xxl),
        clip_tokenizer=clip_tokenizer,
        t5_tokenizer=t5_tokenizer,
    )


def monitor_settings(ns: argparse.Namespace) -> MonitorSettings:
    """Samples (--sample_prompts and its triggers) and validation-loss settings."""
    from fluxpipe.data.prompts import load_prompts

    if (ns.sample_every_n_steps or ns.sample_every_n_epochs or ns.sample_at_first) and not ns.sample_prompts:
        raise FluxpipeError(
            "--sample_every_n_steps / --sample_every_n_epochs / --sample_at_first need "
            "--sample_prompts FILE (a .txt, .toml or .json prompt file)"
        )
    prompts = tuple(load_prompts(Path(ns.sample_prompts))) if ns.sample_prompts else ()
    return MonitorSettings(
        sample_prompts=prompts,
        sample_every_n_steps=ns.sample_every_n_steps,
        sample_every_n_epochs=ns.sample_every_n_epochs,
        sample_at_first=ns.sample_at_first,
        validate_every_n_epochs=ns.validate_every_n_epochs or (None if ns.validate_every_n_steps else 1),
        validate_every_n_steps=ns.validate_every_n_steps,
        max_validation_steps=ns.max_validation_steps,
        validation_seed=ns.validation_seed if ns.validation_seed is not None else ns.seed,
    )


def ema_settings(ns: argparse.Namespace) -> EmaSettings | None:
    """--ema_decay and its options (checked in fluxpipe.config.reference_flags), or None: no EMA."""
    if ns.ema_decay is None:
        return None
    return EmaSettings(
        decay=ns.ema_decay, update_every=ns.ema_update_every, on_cpu=ns.ema_on_cpu, for_eval=ns.ema_for_eval
    )


def common_fields(
    ns: argparse.Namespace,
    caches: CachePaths,
    device: str,
    auto_resume: bool,
    models: tuple[Path | None, Path | None],
    variant: str,
) -> dict[str, Any]:
    """The fields every method's config has (the shared loop's and the DiT's), from the parsed flags."""
    datasets = load_datasets(ns)
    return {
        "flux": Path(ns.pretrained_model_name_or_path),
        "manifest": caches.manifest,
        "latent_index": caches.latent_index,
        "text_index": caches.text_index,
        "output_dir": Path(ns.output_dir),
        "output_name": ns.output_name or "last",
        "batch_sizes": {i: ds.batch_size for i, ds in enumerate(datasets.datasets)},
        "math": flow_settings(ns),
        "max_train_steps": ns.max_train_steps,
        "max_train_epochs": ns.max_train_epochs,
        "gradient_accumulation_steps": ns.gradient_accumulation_steps,
        "compute_dtype": compute_dtype(ns.mixed_precision, device),
        "seed": ns.seed,
        "gradient_checkpointing": ns.gradient_checkpointing,
        "cpu_offload_checkpointing": ns.cpu_offload_checkpointing,
        "blocks_to_swap": ns.blocks_to_swap or 0,
        "save_every_n_epochs": ns.save_every_n_epochs,
        "save_every_n_steps": ns.save_every_n_steps,
        "save_n_epoch_ratio": ns.save_n_epoch_ratio,
        "save_precision": DTYPES[ns.save_precision],
        "save_state": ns.save_state or auto_resume,
        "save_last_n_epochs": ns.save_last_n_epochs,
        "save_last_n_epochs_state": ns.save_last_n_epochs_state,
        "save_last_n_steps": ns.save_last_n_steps,
        "save_last_n_steps_state": ns.save_last_n_steps_state,
        "resume": Path(ns.resume) if ns.resume else None,
        "auto_resume": auto_resume,
        "device": device,
        "logging_dir": Path(ns.logging_dir) if ns.logging_dir else None,
        "log_prefix": ns.log_prefix or "",
        "log_tracker_name": ns.log_tracker_name or "",
        "monitor": monitor_settings(ns),
        "sample_models": sample_models(ns, *models),
        "t5_max_length": ns.t5xxl_max_token_length or default_t5_max_length(variant),
        "ema": ema_settings(ns),
        "live_text": live_text(ns, *models),
        "live_latents": live_latents(ns),
    }


def lora_config(
    ns: argparse.Namespace,
    caches: CachePaths,
    device: str,
    auto_resume: bool,
    clip_tokenizer: Path | None = None,
    t5_tokenizer: Path | None = None,
) -> TrainLoraConfig:
    """The typed training config from the parsed flags (already checked with check_supported)."""
    from fluxpipe.io.tables import read_parquet
    from fluxpipe.training.metadata import dataset_metadata

    table, _ = read_parquet(caches.manifest)
    variant = dit_variant(ns)
    common = common_fields(ns, caches, device, auto_resume, (clip_tokenizer, t5_tokenizer), variant)
    data = data_digest(caches, Path(ns.pretrained_model_name_or_path))
    metadata = training_metadata(ns, variant, 0, int((table.split == "train").sum()), data)
    metadata |= dataset_metadata(load_datasets(ns), table, ns.dataset_config is not None, world_size())
    return TrainLoraConfig(
        **common,
        lora=lora_spec(ns),
        network_weights=Path(ns.network_weights) if ns.network_weights else None,
        learning_rate=ns.learning_rate,
        unet_lr=ns.unet_lr,
        optimizer_type=ns.optimizer_type,
        optimizer_args=parse_optimizer_args(ns.optimizer_args or []),
        lr_scheduler=ns.lr_scheduler,
        lr_warmup_steps=ns.lr_warmup_steps,
        lr_scheduler_num_cycles=ns.lr_scheduler_num_cycles,
        lr_scheduler_power=ns.lr_scheduler_power,
        lr_scheduler_type=ns.lr_scheduler_type,
        lr_scheduler_args=parse_optimizer_args(ns.lr_scheduler_args or [], "lr_scheduler_args"),
        max_grad_norm=ns.max_grad_norm,
        clip_l=None if ns.network_train_unet_only or not ns.clip_l else Path(ns.clip_l),
        lycoris=network_kwargs(ns.network_args or []) if ns.network_module == "lycoris.kohya" else None,
        clip_tokenizer=clip_tokenizer,
        fp8_base=bool(ns.fp8_base or ns.fp8_base_unet),
        text_encoder_lr=tuple(ns.text_encoder_lr) if ns.text_encoder_lr else None,
        torch_compile=ns.torch_compile,
        dynamo_backend=ns.dynamo_backend,
        network_dtype=torch.bfloat16 if ns.full_bf16 else torch.float32,
        kontext=ns.model_type == "kontext",
        prior_loss_weight=ns.prior_loss_weight,
        model_type=ns.model_type,
        metadata=metadata,
    )


def world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def full_config(
    ns: argparse.Namespace,
    caches: CachePaths,
    device: str,
    auto_resume: bool,
    clip_tokenizer: Path | None = None,
    t5_tokenizer: Path | None = None,
) -> TrainFullConfig:
    """The typed full fine-tune config from the parsed flags (checked with check_unhonoured(ns, "full"))."""
    from fluxpipe.training.weights import OptimizerSettings

    variant = dit_variant(ns)
    common = common_fields(ns, caches, device, auto_resume, (clip_tokenizer, t5_tokenizer), variant)
    optim = OptimizerSettings(
        optimizer_type=ns.optimizer_type,
        optimizer_args=parse_optimizer_args(ns.optimizer_args or []),
        learning_rate=ns.learning_rate,
        lr_scheduler=ns.lr_scheduler,
        lr_warmup_steps=ns.lr_warmup_steps,
        lr_scheduler_num_cycles=ns.lr_scheduler_num_cycles,
        lr_scheduler_power=ns.lr_scheduler_power,
        lr_scheduler_type=ns.lr_scheduler_type,
        lr_scheduler_args=parse_optimizer_args(ns.lr_scheduler_args or [], "lr_scheduler_args"),
        max_grad_norm=ns.max_grad_norm,
        fused_backward_pass=ns.fused_backward_pass,
        blockwise_fused_optimizers=ns.blockwise_fused_optimizers,
    )
    return TrainFullConfig(
        **common,
        variant=variant,
        optim=optim,
        full_bf16=ns.full_bf16,
        settings=settings_digest(ns, data_digest(caches, Path(ns.pretrained_model_name_or_path))),
    )


def controlnet_config(
    ns: argparse.Namespace,
    caches: CachePaths,
    device: str,
    auto_resume: bool,
    clip_tokenizer: Path | None = None,
    t5_tokenizer: Path | None = None,
) -> TrainControlNetConfig:
    """The typed ControlNet config: the full fine-tune's settings plus the base model's memory options."""
    import dataclasses

    full = full_config(ns, caches, device, auto_resume, clip_tokenizer, t5_tokenizer)
    return TrainControlNetConfig(
        **{f.name: getattr(full, f.name) for f in dataclasses.fields(full)},
        controlnet=Path(ns.controlnet_model_name_or_path) if ns.controlnet_model_name_or_path else None,
        fp8_base=bool(ns.fp8_base or ns.fp8_base_unet),
        torch_compile=ns.torch_compile,
        dynamo_backend=ns.dynamo_backend,
    )
