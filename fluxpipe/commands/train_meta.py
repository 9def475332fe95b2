"""What identifies a training run: the settings digest (a state resumes only a run with the same one), the data
digest, and the reference's ss_* / modelspec metadata of the saved LoRA (spec §5.7)."""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import uuid
from pathlib import Path

from fluxpipe import __version__
from fluxpipe.commands.model_types import CHROMA_URL
from fluxpipe.commands.train_caches import CachePaths


def settings_digest(ns: argparse.Namespace, data: str = "") -> str:
    """Digest of every flag that changes the result (not where files go or how often they are saved) and of
    the cached data (``data``): a state is resumed only by a run with the same digest."""
    skip = {
        "output_dir",
        "save_every_n_epochs",
        "save_every_n_steps",
        "save_state",
        "resume",
        "cache_dir",
        "save_last_n_epochs",
        "save_last_n_steps",
        "logging_dir",
        "log_with",
        "dataset_config",
        "log_prefix",
        "log_tracker_name",
        "save_n_epoch_ratio",
        "save_last_n_epochs_state",
        "save_last_n_steps_state",
        # memory and speed modes compute the same training: a run may resume in another one
        "blocks_to_swap",
        "cpu_offload_checkpointing",
        "gradient_checkpointing",
        "torch_compile",
        "dynamo_backend",
        "sample_prompts",
        "sample_every_n_steps",
        "sample_every_n_epochs",
        "sample_at_first",
        "validate_every_n_steps",
        "validate_every_n_epochs",
        "max_validation_steps",
        "pretrained_model_name_or_path",
        "clip_l",
        "t5xxl",
        "ae",
        "ema_on_cpu",
        "ema_for_eval",
    }
    if getattr(ns, "ema_decay", None) is None:  # without an EMA the digest is the one of runs before the EMA flags
        skip |= {"ema_decay", "ema_update_every"}
    values = {k: str(v) for k, v in sorted(vars(ns).items()) if k not in skip}
    return hashlib.sha256(json.dumps([values, data]).encode()).hexdigest()[:16]


def data_digest(caches: CachePaths, flux: Path) -> str:
    """What the run trains on: the cache entry keys (content hashes) and the DiT file's identity."""
    from fluxpipe.io.hashing import cached_sha256
    from fluxpipe.io.tables import read_parquet

    keys = [sorted(read_parquet(p)[0].key) for p in (caches.latent_index, caches.text_index)]
    return hashlib.sha256(json.dumps([keys, cached_sha256(flux)[0]]).encode()).hexdigest()


def training_metadata(ns: argparse.Namespace, variant: str, batches: int, images: int, data: str) -> dict[str, str]:
    """The ss_* and modelspec metadata of the reference (spec §5.7), as strings."""
    meta = {
        "ss_session_id": uuid.uuid4().hex[:12],
        "ss_training_started_at": str(int(time.time())),
        "ss_output_name": ns.output_name or "last",
        "ss_learning_rate": str(ns.learning_rate),
        "ss_unet_lr": str(ns.unet_lr),
        "ss_text_encoder_lr": str(ns.text_encoder_lr),
        "ss_num_train_images": str(images),
        "ss_num_batches_per_epoch": str(batches),
        "ss_num_epochs": str(ns.max_train_epochs),
        "ss_gradient_checkpointing": str(ns.gradient_checkpointing),
        "ss_gradient_accumulation_steps": str(ns.gradient_accumulation_steps),
        "ss_max_train_steps": str(ns.max_train_steps),
        "ss_lr_warmup_steps": str(ns.lr_warmup_steps),
        "ss_lr_scheduler": ns.lr_scheduler,
        "ss_network_module": ns.network_module or "networks.lora_flux",
        "ss_network_dim": str(ns.network_dim),
        "ss_network_alpha": str(ns.network_alpha),
        "ss_network_dropout": str(ns.network_dropout),
        "ss_network_train_unet_only": str(bool(ns.network_train_unet_only)),
        "ss_mixed_precision": ns.mixed_precision,
        "ss_v2": "False",
        "ss_base_model_version": "chroma" if variant == "chroma" else "flux1",
        "ss_cache_latents": "True",
        "ss_seed": str(ns.seed),
        "ss_optimizer": f"{ns.optimizer_type}({' '.join(ns.optimizer_args or [])})",
        "ss_max_grad_norm": str(ns.max_grad_norm),
        "ss_loss_type": ns.loss_type,
        "ss_model_type": ns.model_type,
        "ss_apply_t5_attn_mask": str(ns.apply_t5_attn_mask),
        "ss_weighting_scheme": ns.weighting_scheme,
        "ss_logit_mean": str(ns.logit_mean),
        "ss_logit_std": str(ns.logit_std),
        "ss_mode_scale": str(ns.mode_scale),
        "ss_guidance_scale": str(ns.guidance_scale),
        "ss_timestep_sampling": ns.timestep_sampling,
        "ss_sigmoid_scale": str(ns.sigmoid_scale),
        "ss_model_prediction_type": ns.model_prediction_type,
        "ss_discrete_flow_shift": str(ns.discrete_flow_shift),
        "ss_ip_noise_gamma": str(ns.ip_noise_gamma),
        "ss_fp8_base": str(bool(ns.fp8_base)),
        "ss_fp8_base_unet": str(bool(ns.fp8_base_unet)),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "chroma/lora" if variant == "chroma" else f"flux-1-{variant}/lora",
        "modelspec.implementation": CHROMA_URL if variant == "chroma" else "https://github.com/black-forest-labs/flux",
        "modelspec.title": ns.output_name or "last",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.implementation_version": f"fluxpipe/{__version__}",
        "fluxpipe_settings": settings_digest(ns, data),
    }
    if ns.network_args:
        meta["ss_network_args"] = network_args_metadata(ns.network_args, ns.network_dropout)
    return meta


def network_args_metadata(network_args: list[str], network_dropout: float | None) -> str:
    """The reference's ss_network_args: a JSON object of the ``key=value`` strings (values kept as strings),
    ``dropout`` (--network_dropout, null when unset) added when the args do not set it; only written when
    --network_args is given."""
    kwargs: dict[str, object] = {k: v for k, _, v in (a.partition("=") for a in network_args if "=" in a)}
    kwargs.setdefault("dropout", network_dropout)
    return json.dumps(kwargs)
