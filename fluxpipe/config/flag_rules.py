"""What fluxpipe does differently from the reference's flags (spec §10): changed defaults, rejected and ignored
flags, the allowed values of each choice flag and the help of fluxpipe's own flags."""

from __future__ import annotations

from typing import Any

from fluxpipe.config.names import LR_SCHEDULERS

CHANGED_DEFAULTS: dict[str, tuple[Any, Any, str]] = {
    "--timestep_sampling": (
        "sigma",
        "flux_shift",
        "resolution-dependent shift as BFL trains and samples; the "
        "reference docs recommend shift/flux_shift over its own default (spec §4.2, §14.2)",
    ),
    "--model_prediction_type": (
        "sigma_scaled",
        "raw",
        "only raw pairs a velocity prediction with the velocity "
        "target; sigma_scaled is the 'LoRA has no effect' trap (spec §4.4, §14.2)",
    ),
    "--guidance_scale": (3.5, 1.0, "the reference docs recommend 1.0 for dev LoRA training (spec §4.3, §15)"),
}

REJECTED: dict[str, str] = {
    "v2": "SD-only (Stable Diffusion 2.x); FLUX has no such mode: remove it",
    "v_parameterization": "SD-only (v-prediction); FLUX always predicts the flow velocity: remove it",
    "clip_skip": "SD-only; FLUX uses CLIP-L's pooled output only: remove it",
    "max_token_length": "is for SD's CLIP (the reference ignores it for FLUX): use --t5xxl_max_token_length",
}

IGNORED_FOR_FLUX: tuple[str, ...] = (  # spec §4.2, §10.1-10.8 "no-op" notes; accepted with a warning
    "--noise_offset",
    "--noise_offset_random_strength",
    "--multires_noise_iterations",
    "--multires_noise_discount",
    "--adaptive_noise_scale",
    "--zero_terminal_snr",
    "--min_timestep",
    "--max_timestep",
    "--min_snr_gamma",
    "--debiased_estimation_loss",
    "--scale_v_pred_loss_like_noise_pred",
    "--v_pred_like_loss",
    "--weighted_captions",
    "--sample_sampler",
    "--xformers",
    "--mem_eff_attn",
    "--sdpa",
    "--vae",
    "--controlnet_model_name_or_path",
    "--fused_backward_pass",
)


CHOICES: dict[str, tuple[Any, ...]] = {  # checked after parsing, so TOML values are checked as well
    "model_type": ("flux", "kontext", "chroma"),
    "timestep_sampling": ("sigma", "uniform", "sigmoid", "shift", "flux_shift"),
    "model_prediction_type": ("raw", "additive", "sigma_scaled"),
    "weighting_scheme": ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform"),
    "resize_interpolation": (None, "lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area"),
    "mixed_precision": ("no", "fp16", "bf16"),
    "save_precision": (None, "float", "fp16", "bf16"),
    "loss_type": ("l1", "l2", "huber", "smooth_l1"),
    "huber_schedule": ("constant", "exponential", "snr"),
    "lr_scheduler": LR_SCHEDULERS,
    "save_model_as": ("safetensors",),
    "dynamo_backend": (
        "eager",
        "aot_eager",
        "inductor",
        "aot_ts_nvfuser",
        "nvprims_nvfuser",
        "cudagraphs",
        "ofi",
        "fx2trt",
        "onnxrt",
        "tensort",
        "ipex",
        "tvm",
    ),
    "sample_sampler": (
        "ddim",
        "pndm",
        "lms",
        "euler",
        "euler_a",
        "heun",
        "dpm_2",
        "dpm_2_a",
        "dpmsolver",
        "dpmsolver++",
        "dpmsingle",
        "k_lms",
        "k_euler",
        "k_euler_a",
        "k_dpm_2",
        "k_dpm_2_a",
    ),
    "log_with": (None, "tensorboard", "wandb", "all"),
    "zero_stage": (0, 1, 2, 3),
    "console_log_level": (None, "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
    "offload_optimizer_device": (None, "cpu", "nvme"),
    "offload_param_device": (None, "cpu", "nvme"),
}
CHOICE_HINTS = {
    "model_type": "fluxpipe trains FLUX.1 (flux), FLUX.1 Kontext [dev] (kontext, fluxpipe's own value) and "
    "Chroma (chroma)",
    "save_model_as": "fluxpipe writes safetensors only, never pickle (ckpt/pt)",
}


EXTENSION_HELP = {  # fluxpipe's own flags (the reference has no EMA)
    "ema_decay": "keep an EMA of the trained weights with this decay (0 < d < 1, e.g. 0.999; diffusers' EMAModel "
    "warm-up: min(d, (1 + t) / (10 + t))), saved as <name>-ema.safetensors beside each model file",
    "ema_update_every": "update the EMA every N optimizer steps (needs --ema_decay)",
    "ema_on_cpu": "keep the EMA in host memory (the full fine-tune's EMA is a whole DiT; needs --ema_decay)",
    "ema_for_eval": "samples and the validation loss use the EMA weights (needs --ema_decay)",
}


POSITIVE_OR_UNSET = {  # the reference would train a rank-4 LoRA labelled 0, or save every |n| steps
    "network_dim": "the LoRA rank; leave it out for 4",
    "save_every_n_steps": "leave it out to save no steps",
    "save_every_n_epochs": "leave it out to save no epochs",
    "save_n_epoch_ratio": "leave it out",
    "save_last_n_epochs": "leave it out to keep all",
    "save_last_n_steps": "leave it out to keep all",
    "save_last_n_epochs_state": "leave it out to keep all",
    "save_last_n_steps_state": "leave it out to keep all",
    "sample_every_n_steps": "leave it out for no samples",
    "sample_every_n_epochs": "leave it out for no samples",
    "validate_every_n_steps": "leave it out",
    "validate_every_n_epochs": "leave it out",
    "max_validation_steps": "leave it out for all",
    "vae_batch_size": "leave it out for 1",
    "text_encoder_batch_size": "leave it out",
}
