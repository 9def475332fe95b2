"""From the reference trainer's flags to fluxpipe's typed LoRA training config (and the caches it reads).

``fluxpipe train lora <flags>`` parses the flags (fluxpipe.config.reference_flags), makes sure the manifest and both
caches exist (the pipeline's, given by ``--cache_dir``, or built in ``<output_dir>/.fluxpipe-cache`` with
the same stage code), and builds a ``TrainLoraConfig``. Features not built yet fail or warn here, loudly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fluxpipe import __version__
from fluxpipe.errors import FluxpipeError
from fluxpipe.inference.sampler import ModelFiles
from fluxpipe.lora.network import LoraSpec, parse_network_args
from fluxpipe.stages.train_lora import FlowSettings, TrainLoraConfig
from fluxpipe.training.ema import EmaSettings
from fluxpipe.training.optim import parse_optimizer_args

if TYPE_CHECKING:
    from fluxpipe.stages.train_controlnet import TrainControlNetConfig
    from fluxpipe.stages.train_full import TrainFullConfig
from fluxpipe.config.reference_flags import DATASET_FLAGS, FOLDER_FLAGS, dataset_flag_defaults
from fluxpipe.data.text_encoding import default_t5_max_length
from fluxpipe.training.monitor import MonitorSettings

log = logging.getLogger(__name__)
DTYPES = {None: None, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class CachePaths:
    manifest: Path
    latent_index: Path
    text_index: Path


def pipeline_caches(cache_dir: Path) -> CachePaths:
    """The Snakemake pipeline's caches under ``cache_dir`` (normally results/)."""
    return CachePaths(
        manifest=cache_dir / "dataset/manifest.parquet",
        latent_index=cache_dir / "cache/latents/index.parquet",
        text_index=cache_dir / "cache/text/index.parquet",
    )


def with_cli_validation(datasets, ns: argparse.Namespace):  # noqa: ANN001, ANN201 - DatasetsConfig
    """--validation_split / --validation_seed for the datasets whose TOML sets none (the TOML wins)."""
    from dataclasses import replace

    if not ns.validation_split and ns.validation_seed is None:
        return datasets
    out = [
        replace(
            ds,
            validation_split=ds.validation_split or (ns.validation_split or 0.0),
            validation_seed=ds.validation_seed if ds.validation_seed is not None else ns.validation_seed,
        )
        for ds in datasets.datasets
    ]
    return replace(datasets, datasets=tuple(out) if isinstance(datasets.datasets, tuple) else out)


def load_datasets(ns: argparse.Namespace):  # noqa: ANN201 - DatasetsConfig
    """The dataset as the reference builds it from the flags: --dataset_config (TOML or JSON), else folder mode
    (--train_data_dir N_concept subfolders, --reg_data_dir, --in_json); command-line dataset flags as fallbacks."""
    from fluxpipe.config.dataset import folder_datasets, load_dataset_toml, parse_datasets

    defaults = dataset_flag_defaults(ns)
    if ns.dataset_config is not None:
        folders = [f"--{f}" for f in FOLDER_FLAGS if getattr(ns, f) is not None]
        if folders:
            log.warning("%s ignored: --dataset_config is given (as by the reference)", ", ".join(folders))
        return load_dataset_toml(ns.dataset_config, defaults)
    if ns.train_data_dir is None:
        raise FluxpipeError(
            "no dataset: give --dataset_config (a TOML or JSON file) or --train_data_dir (a folder "
            "of N_concept subfolders) with --resolution"
        )
    if "resolution" not in defaults:
        raise FluxpipeError("--train_data_dir needs --resolution (SIZE or W,H, e.g. 512 or 768,512)")
    data = folder_datasets(ns.train_data_dir, ns.reg_data_dir, ns.in_json)
    return parse_datasets(data, f"--train_data_dir {ns.train_data_dir}", defaults)


def build_caches(
    ns: argparse.Namespace, work: Path, device: str, clip_tokenizer: Path | None, t5_tokenizer: Path | None
) -> CachePaths:
    """Manifest and both caches for a standalone run (one shard each; reruns reuse unchanged entries)."""
    from fluxpipe.config.dataset import check_cacheable
    from fluxpipe.data.text_encoding import default_t5_max_length
    from fluxpipe.io.checkpoints import inspect_checkpoint
    from fluxpipe.stages import cache_index, cache_latents, cache_text, manifest

    datasets = with_cli_validation(load_datasets(ns), ns)
    check_cacheable(datasets, cache_latents=True, cache_text=True)
    paths = pipeline_caches(work)
    seed = 42 if ns.seed is None else ns.seed  # (cached caption slot v is each item's caption of epoch v)
    options = {"masked_loss": bool(ns.masked_loss), "caption_seed": seed}
    manifest.run(
        manifest.ManifestConfig(datasets=datasets, out=paths.manifest, latent_shards=1, text_shards=1, **options)
    )
    variant = inspect_checkpoint(ns.pretrained_model_name_or_path, "flux").describe()["variant"]
    for kind in ("latents", "text"):
        shard = work / f"cache/{kind}/shard-000.safetensors"
        shard.unlink(missing_ok=True)
        if kind == "latents":
            cache_latents.run(
                cache_latents.CacheLatentsConfig(
                    manifest=paths.manifest,
                    ae=Path(ns.ae),
                    out=shard,
                    shard=0,
                    batch_size=ns.vae_batch_size or 1,
                    device=device,
                    references=ns.model_type == "kontext",
                )
            )
        else:
            cache_text.run(
                cache_text.CacheTextConfig(
                    manifest=paths.manifest,
                    clip_l=Path(ns.clip_l),
                    t5xxl=Path(ns.t5xxl),
                    clip_tokenizer=clip_tokenizer,
                    t5_tokenizer=t5_tokenizer,
                    out=shard,
                    shard=0,
                    max_length=ns.t5xxl_max_token_length or default_t5_max_length(variant),
                    apply_t5_attn_mask=ns.apply_t5_attn_mask,
                    device=device,
                )
            )
        index = paths.latent_index if kind == "latents" else paths.text_index
        cache_index.run(
            cache_index.CacheIndexConfig(
                kind=kind,
                manifest=paths.manifest,
                shards=(shard,),
                index=index,
                summary=index.with_name("summary.json"),
            )
        )
    return paths


def compute_dtype(mixed_precision: str, device: str) -> torch.dtype:
    """Base-model dtype: fp32 for 'no'; bf16 / fp16 on a GPU; on the CPU fp16 falls back to bf16 (fp16 matmuls
    are unusably slow there)."""
    if mixed_precision == "no":
        return torch.float32
    if mixed_precision == "fp16" and not device.startswith("cuda"):
        log.warning("--mixed_precision fp16 on the CPU: computing in bf16 instead (fp16 matmuls are unusably slow)")
        return torch.bfloat16
    return torch.float16 if mixed_precision == "fp16" else torch.bfloat16


# flags the trainer honours (the others of the reference either are IGNORED_FOR_FLUX, or are refused below
# when set to anything but their default, so that no accepted flag is silently dropped)
HONOURED = (
    frozenset(
        """
pretrained_model_name_or_path clip_l t5xxl ae dataset_config output_dir output_name save_model_as network_module
network_dim network_alpha network_dropout network_args network_weights learning_rate unet_lr optimizer_type
optimizer_args lr_scheduler lr_warmup_steps lr_scheduler_num_cycles lr_scheduler_power max_train_steps
max_train_epochs gradient_accumulation_steps max_grad_norm mixed_precision seed gradient_checkpointing
save_every_n_epochs save_every_n_steps save_precision save_state resume timestep_sampling sigmoid_scale
discrete_flow_shift weighting_scheme logit_mean logit_std mode_scale model_prediction_type guidance_scale
loss_type huber_schedule huber_c huber_scale ip_noise_gamma ip_noise_gamma_random_strength apply_t5_attn_mask
t5xxl_max_token_length cache_latents cache_latents_to_disk cache_text_encoder_outputs
cache_text_encoder_outputs_to_disk vae_batch_size network_train_unet_only blocks_to_swap config_file text_encoder_lr
save_last_n_epochs save_last_n_epochs_state save_last_n_steps save_last_n_steps_state fp8_base fp8_base_unet
use_8bit_adam use_lion_optimizer caption_extension caption_extention train_batch_size cpu_offload_checkpointing
full_bf16 save_n_epoch_ratio logging_dir log_with log_prefix log_tracker_name torch_compile dynamo_backend
sample_prompts sample_every_n_steps sample_every_n_epochs sample_at_first validation_seed validation_split
validate_every_n_steps validate_every_n_epochs max_validation_steps model_type
ema_decay ema_update_every ema_on_cpu ema_for_eval prior_loss_weight masked_loss
""".split()
    )
    | {"max_data_loader_n_workers", "persistent_data_loader_workers", "highvram"}
    | set(DATASET_FLAGS)
    | set(FOLDER_FLAGS)
)
# (the data-loader flags and --highvram change no result: the trainer reads the cached tensors in its own process,
# with no loader workers to configure, and --highvram only skips the reference's cache clearing; they are accepted
# so that reference commands run unchanged. The dataset flags act through load_datasets.)
# handled with a warning or an error of their own in check_supported
SPECIAL = frozenset({"blocks_to_swap", "network_train_unet_only"})


# the full fine-tune: the maths, data, loop, saving, sample and validation flags, its own memory options; no
# network, no fp8 base (the reference's has no fp8 path either)
HONOURED_FULL = frozenset(
    HONOURED
    - {
        "network_module",
        "network_dim",
        "network_alpha",
        "network_dropout",
        "network_args",
        "network_weights",
        "unet_lr",
        "text_encoder_lr",
        "network_train_unet_only",
        "fp8_base",
        "fp8_base_unet",
        "torch_compile",
        "dynamo_backend",
        "prior_loss_weight",
    }
    | {"fused_backward_pass", "blockwise_fused_optimizers", "mem_eff_save"}
)


# ControlNet: the full fine-tune's flags, plus what concerns the frozen base model and the starting ControlNet
# (samples and validation loss during ControlNet training are not wired yet: refused, not ignored)
HONOURED_CONTROLNET = frozenset(
    (
        HONOURED_FULL
        | {
            "blocks_to_swap",
            "fp8_base",
            "fp8_base_unet",
            "torch_compile",
            "dynamo_backend",
            "controlnet_model_name_or_path",
        }
    )
    - set(FOLDER_FLAGS)  # ControlNet folder mode (with --conditioning_data_dir): not yet
    - {
        "masked_loss",  # (its conditioning images are the ControlNet's input, not masks)
        "sample_prompts",
        "sample_every_n_steps",
        "sample_every_n_epochs",
        "sample_at_first",
        "validation_seed",
        "validation_split",
        "validate_every_n_steps",
        "validate_every_n_epochs",
        "max_validation_steps",
        "ema_for_eval",
    }
)


def check_unhonoured(ns: argparse.Namespace, method: str = "lora") -> None:
    """Refuse every flag set away from its default that the trainer would not act on."""
    from fluxpipe.config.reference_flags import build_parser, ignored_for

    defaults = vars(build_parser().parse_args([]))
    ignored = {flag.lstrip("-") for flag in ignored_for(method)}
    honoured = {"lora": HONOURED, "full": HONOURED_FULL, "controlnet": HONOURED_CONTROLNET}[method]
    unused = sorted(
        k
        for k, v in vars(ns).items()
        if k in defaults and v != defaults[k] and k not in honoured and k not in ignored and k != "network_module"
    )
    if unused:
        what = {"lora": "LoRA trainer", "full": "full fine-tune", "controlnet": "ControlNet trainer"}[method]
        raise FluxpipeError(
            f"not implemented yet in fluxpipe's {what}: {', '.join('--' + k for k in unused)}; "
            "leave them out (see the README's list)"
        )


def check_supported(ns: argparse.Namespace, device: str, method: str = "lora") -> None:
    """Features of the reference that fluxpipe's trainer does not have yet: an error, or a warning when the
    run is still the same training (never a silent change)."""
    from fluxpipe.training.log import check_logging
    from fluxpipe.training.optim import check_optimizer_args

    check_unhonoured(ns, method)
    if ns.output_dir is None:
        raise FluxpipeError("--output_dir is required: the folder the trained files go into")
    check_optimizer_args(ns.optimizer_type, list(ns.optimizer_args or []))
    if method == "controlnet" and ns.loss_type in ("huber", "smooth_l1"):
        raise FluxpipeError(
            f"--loss_type {ns.loss_type}: ControlNet training uses l2 or l1 (the reference passes "
            "no Huber threshold here)"
        )
    check_logging(ns.logging_dir, ns.log_with)
    check_kontext(ns, method)
    if ns.blocks_to_swap and not device.startswith("cuda"):
        log.warning(
            "--blocks_to_swap %d: the model already lives in host memory on the CPU, ignored", ns.blocks_to_swap
        )
    if ns.cpu_offload_checkpointing and not ns.gradient_checkpointing:
        raise FluxpipeError(
            "--cpu_offload_checkpointing offloads the inputs of checkpointed blocks: add "
            "--gradient_checkpointing (without it the flag would do nothing)"
        )


def check_kontext(ns: argparse.Namespace, method: str) -> None:
    """--model_type kontext (fluxpipe's own value: a Kontext file has FLUX.1-dev's shapes and keys, so only the
    flag tells them apart) trains LoRAs only, and its training-time samples are not wired yet."""
    if ns.model_type != "kontext":
        return
    if method != "lora":
        raise FluxpipeError(
            f"--model_type kontext: only LoRA training supports Kontext (not `train {method}`); "
            "use `fluxpipe train lora`"
        )
    if ns.masked_loss:
        raise FluxpipeError(
            "--model_type kontext with --masked_loss: a Kontext conditioning image is the reference, not a "
            "mask; remove --masked_loss (alpha_mask in the dataset config masks by the image's alpha)"
        )
    if ns.sample_prompts:
        raise FluxpipeError(
            "--model_type kontext with --sample_prompts: training-time samples have no reference "
            "image yet; leave --sample_prompts out and use the evaluate stage or `fluxpipe sample "
            "--reference-image`"
        )


def check_kontext_pairs(ns: argparse.Namespace, datasets) -> None:  # noqa: ANN001 - DatasetsConfig
    """Kontext trains on pairs: every subset needs its reference images (conditioning_data_dir, same stems)."""
    if ns.model_type != "kontext":
        return
    bare = [
        f"datasets[{d}].subsets[{s}]"
        for d, ds in enumerate(datasets.datasets)
        for s, sub in enumerate(ds.subsets)
        if sub.conditioning_data_dir is None
    ]
    if bare:
        raise FluxpipeError(
            f"{ns.dataset_config or 'the dataset'}: {', '.join(bare)} has no conditioning_data_dir; "
            "--model_type kontext trains on pairs: add conditioning_data_dir (a folder with one "
            "reference image per target image, same file stem)"
        )


def lora_spec(ns: argparse.Namespace) -> LoraSpec:
    try:
        extra = parse_network_args(list(ns.network_args or []))
        spec = LoraSpec(
            network_dim=ns.network_dim or 4, network_alpha=ns.network_alpha, dropout=ns.network_dropout, **extra
        )
    except ValueError as e:
        raise FluxpipeError(f"--network_args: {e}") from e
    if spec.train_t5xxl:
        raise FluxpipeError(
            "--network_args train_t5xxl=True: a T5 LoRA needs T5 to run every step, which the "
            "cached text-encoder outputs rule out (the reference refuses this too)"
        )
    return spec


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
        "ss_network_module": "networks.lora_flux",
        "ss_network_dim": str(ns.network_dim),
        "ss_network_alpha": str(ns.network_alpha),
        "ss_network_dropout": str(ns.network_dropout),
        "ss_network_args": json.dumps(ns.network_args or []),
        "ss_network_train_unet_only": str(bool(ns.network_train_unet_only)),
        "ss_mixed_precision": ns.mixed_precision,
        "ss_v2": "False",
        "ss_base_model_version": "flux1",
        "ss_cache_latents": "True",
        "ss_seed": str(ns.seed),
        "ss_optimizer": f"{ns.optimizer_type}({' '.join(ns.optimizer_args or [])})",
        "ss_max_grad_norm": str(ns.max_grad_norm),
        "ss_loss_type": ns.loss_type,
        "ss_model_type": "flux",
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
        "modelspec.architecture": f"flux-1-{variant}/lora",
        "modelspec.implementation": "https://github.com/black-forest-labs/flux",
        "modelspec.title": ns.output_name or "last",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.implementation_version": f"fluxpipe/{__version__}",
        "fluxpipe_settings": settings_digest(ns, data),
    }
    return meta


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
    if not (ns.ae and ns.clip_l and ns.t5xxl):
        return None
    return ModelFiles(
        flux=Path(ns.pretrained_model_name_or_path),
        ae=Path(ns.ae),
        clip_l=Path(ns.clip_l),
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


def lora_config(
    ns: argparse.Namespace,
    caches: CachePaths,
    device: str,
    auto_resume: bool,
    clip_tokenizer: Path | None = None,
    t5_tokenizer: Path | None = None,
) -> TrainLoraConfig:
    """The typed training config from the parsed flags (already checked with check_supported)."""
    from fluxpipe.io.checkpoints import inspect_checkpoint
    from fluxpipe.io.tables import read_parquet

    ns.seed = 42 if ns.seed is None else ns.seed  # deterministic by default (the reference draws a random seed)
    datasets = load_datasets(ns)
    table, _ = read_parquet(caches.manifest)
    variant = inspect_checkpoint(ns.pretrained_model_name_or_path, "flux").describe()["variant"]
    t5_max_length = ns.t5xxl_max_token_length or default_t5_max_length(variant)
    math_settings = flow_settings(ns)
    return TrainLoraConfig(
        flux=Path(ns.pretrained_model_name_or_path),
        manifest=caches.manifest,
        latent_index=caches.latent_index,
        text_index=caches.text_index,
        output_dir=Path(ns.output_dir),
        output_name=ns.output_name or "last",
        batch_sizes={i: ds.batch_size for i, ds in enumerate(datasets.datasets)},
        lora=lora_spec(ns),
        math=math_settings,
        network_weights=Path(ns.network_weights) if ns.network_weights else None,
        learning_rate=ns.learning_rate,
        unet_lr=ns.unet_lr,
        optimizer_type=ns.optimizer_type,
        optimizer_args=parse_optimizer_args(ns.optimizer_args or []),
        lr_scheduler=ns.lr_scheduler,
        lr_warmup_steps=ns.lr_warmup_steps,
        lr_scheduler_num_cycles=ns.lr_scheduler_num_cycles,
        lr_scheduler_power=ns.lr_scheduler_power,
        max_train_steps=ns.max_train_steps,
        max_train_epochs=ns.max_train_epochs,
        gradient_accumulation_steps=ns.gradient_accumulation_steps,
        max_grad_norm=ns.max_grad_norm,
        compute_dtype=compute_dtype(ns.mixed_precision, device),
        seed=ns.seed,
        gradient_checkpointing=ns.gradient_checkpointing,
        save_every_n_epochs=ns.save_every_n_epochs,
        save_every_n_steps=ns.save_every_n_steps,
        save_precision=DTYPES[ns.save_precision],
        save_state=ns.save_state or auto_resume,
        resume=Path(ns.resume) if ns.resume else None,
        auto_resume=auto_resume,
        device=device,
        clip_l=None if ns.network_train_unet_only else Path(ns.clip_l),
        clip_tokenizer=clip_tokenizer,
        fp8_base=bool(ns.fp8_base or ns.fp8_base_unet),
        save_last_n_epochs=ns.save_last_n_epochs,
        save_last_n_epochs_state=ns.save_last_n_epochs_state,
        save_last_n_steps=ns.save_last_n_steps,
        save_last_n_steps_state=ns.save_last_n_steps_state,
        text_encoder_lr=tuple(ns.text_encoder_lr) if ns.text_encoder_lr else None,
        blocks_to_swap=ns.blocks_to_swap or 0,
        cpu_offload_checkpointing=ns.cpu_offload_checkpointing,
        torch_compile=ns.torch_compile,
        dynamo_backend=ns.dynamo_backend,
        network_dtype=torch.bfloat16 if ns.full_bf16 else torch.float32,
        save_n_epoch_ratio=ns.save_n_epoch_ratio,
        logging_dir=Path(ns.logging_dir) if ns.logging_dir else None,
        log_prefix=ns.log_prefix or "",
        log_tracker_name=ns.log_tracker_name or "",
        monitor=monitor_settings(ns),
        t5_max_length=t5_max_length,
        ema=ema_settings(ns),
        kontext=ns.model_type == "kontext",
        prior_loss_weight=ns.prior_loss_weight,
        sample_models=sample_models(ns, clip_tokenizer, t5_tokenizer),
        metadata=training_metadata(
            ns,
            variant,
            0,
            int((table.split == "train").sum()),
            data_digest(caches, Path(ns.pretrained_model_name_or_path)),
        ),
    )


def full_config(
    ns: argparse.Namespace,
    caches: CachePaths,
    device: str,
    auto_resume: bool,
    clip_tokenizer: Path | None = None,
    t5_tokenizer: Path | None = None,
) -> TrainFullConfig:
    """The typed full fine-tune config from the parsed flags (checked with check_unhonoured(ns, "full"))."""
    from fluxpipe.io.checkpoints import inspect_checkpoint
    from fluxpipe.stages.train_full import TrainFullConfig
    from fluxpipe.training.weights import OptimizerSettings

    ns.seed = 42 if ns.seed is None else ns.seed
    datasets = load_datasets(ns)
    variant = inspect_checkpoint(ns.pretrained_model_name_or_path, "flux").describe()["variant"]
    optim = OptimizerSettings(
        optimizer_type=ns.optimizer_type,
        optimizer_args=parse_optimizer_args(ns.optimizer_args or []),
        learning_rate=ns.learning_rate,
        lr_scheduler=ns.lr_scheduler,
        lr_warmup_steps=ns.lr_warmup_steps,
        lr_scheduler_num_cycles=ns.lr_scheduler_num_cycles,
        lr_scheduler_power=ns.lr_scheduler_power,
        max_grad_norm=ns.max_grad_norm,
        fused_backward_pass=ns.fused_backward_pass,
        blockwise_fused_optimizers=ns.blockwise_fused_optimizers,
    )
    return TrainFullConfig(
        flux=Path(ns.pretrained_model_name_or_path),
        manifest=caches.manifest,
        latent_index=caches.latent_index,
        text_index=caches.text_index,
        output_dir=Path(ns.output_dir),
        output_name=ns.output_name or "last",
        batch_sizes={i: ds.batch_size for i, ds in enumerate(datasets.datasets)},
        variant=variant,
        math=flow_settings(ns),
        optim=optim,
        max_train_steps=ns.max_train_steps,
        max_train_epochs=ns.max_train_epochs,
        gradient_accumulation_steps=ns.gradient_accumulation_steps,
        compute_dtype=compute_dtype(ns.mixed_precision, device),
        full_bf16=ns.full_bf16,
        seed=ns.seed,
        gradient_checkpointing=ns.gradient_checkpointing,
        cpu_offload_checkpointing=ns.cpu_offload_checkpointing,
        blocks_to_swap=ns.blocks_to_swap or 0,
        save_every_n_epochs=ns.save_every_n_epochs,
        save_every_n_steps=ns.save_every_n_steps,
        save_n_epoch_ratio=ns.save_n_epoch_ratio,
        save_precision=DTYPES[ns.save_precision],
        save_state=ns.save_state or auto_resume,
        save_last_n_epochs=ns.save_last_n_epochs,
        save_last_n_epochs_state=ns.save_last_n_epochs_state,
        save_last_n_steps=ns.save_last_n_steps,
        save_last_n_steps_state=ns.save_last_n_steps_state,
        resume=Path(ns.resume) if ns.resume else None,
        auto_resume=auto_resume,
        device=device,
        settings=settings_digest(ns, data_digest(caches, Path(ns.pretrained_model_name_or_path))),
        logging_dir=Path(ns.logging_dir) if ns.logging_dir else None,
        log_prefix=ns.log_prefix or "",
        log_tracker_name=ns.log_tracker_name or "",
        ema=ema_settings(ns),
        monitor=monitor_settings(ns),
        sample_models=sample_models(ns, clip_tokenizer, t5_tokenizer),
        t5_max_length=ns.t5xxl_max_token_length or default_t5_max_length(variant),
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

    from fluxpipe.stages.train_controlnet import TrainControlNetConfig

    full = full_config(ns, caches, device, auto_resume, clip_tokenizer, t5_tokenizer)
    return TrainControlNetConfig(
        **{f.name: getattr(full, f.name) for f in dataclasses.fields(full)},
        controlnet=Path(ns.controlnet_model_name_or_path) if ns.controlnet_model_name_or_path else None,
        fp8_base=bool(ns.fp8_base or ns.fp8_base_unet),
        torch_compile=ns.torch_compile,
        dynamo_backend=ns.dynamo_backend,
    )
