"""Which of the reference trainer's flags each training method acts on, and the checks of a command's flags
before anything is built: a flag set away from its default that the method would not act on is an error (never
silently dropped); features of the reference not built yet fail or warn here, loudly."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fluxpipe.config.reference_flags import DATASET_FLAGS, FOLDER_FLAGS
from fluxpipe.commands.model_types import dit_variant
from fluxpipe.config.model_types import check_chroma
from fluxpipe.errors import FluxpipeError

log = logging.getLogger(__name__)


# flags the trainer honours (the others of the reference either are IGNORED_FOR_FLUX, or are refused below
# when set to anything but their default, so that no accepted flag is silently dropped)
HONOURED = (
    frozenset(
        """
pretrained_model_name_or_path clip_l t5xxl ae dataset_config output_dir output_name save_model_as network_module
network_dim network_alpha network_dropout network_args network_weights learning_rate unet_lr optimizer_type
optimizer_args lr_scheduler lr_warmup_steps lr_scheduler_num_cycles lr_scheduler_power lr_scheduler_type
lr_scheduler_args max_train_steps
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
    - {"masked_loss"}  # (its conditioning images are the ControlNet's input, not masks)
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
            f"leave them out (`fluxpipe train {method} --help-all` marks them)"
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
    if method == "lora" and ns.network_module != "lycoris.kohya":
        from fluxpipe.commands.train import lora_spec

        lora_spec(ns)  # --network_args (train_t5xxl with cached text) fail before the caches are built
    if method == "controlnet" and ns.loss_type in ("huber", "smooth_l1"):
        raise FluxpipeError(
            f"--loss_type {ns.loss_type}: ControlNet training uses l2 or l1 (the reference passes "
            "no Huber threshold here)"
        )
    check_logging(ns.logging_dir, ns.log_with)
    check_kontext(ns, method)
    check_chroma(ns, method)
    if ns.pretrained_model_name_or_path and Path(ns.pretrained_model_name_or_path).is_file():
        dit_variant(ns)  # a FLUX file under --model_type chroma (or the reverse) fails before any work
    if method == "lora" and ns.network_module == "lycoris.kohya" and not ns.network_train_unet_only:
        raise FluxpipeError(
            "--network_module lycoris.kohya: fluxpipe trains LyCORIS on the DiT only: add --network_train_unet_only"
        )
    if method == "lora" and ns.network_module == "lycoris.kohya" and ns.fp8_base:
        raise FluxpipeError("--fp8_base with --network_module lycoris.kohya: not supported yet; leave --fp8_base out")
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


def check_controlnet_crops(method: str, ns: argparse.Namespace, datasets) -> None:  # noqa: ANN001 - DatasetsConfig
    """ControlNet pairs are cut at the target's centred crop (as the reference's ControlNetDataset, which refuses
    random_crop): a crop drawn each step (random_crop; face_crop_aug_range without buckets) would misalign them."""
    if method != "controlnet":
        return
    for i, ds in enumerate(datasets.datasets):
        for j, sub in enumerate(ds.subsets):
            face = sub.face_crop_aug_range is not None and not ds.enable_bucket
            if sub.random_crop or face:
                option = "random_crop" if sub.random_crop else "face_crop_aug_range"
                raise FluxpipeError(
                    f"{datasets.source}: datasets[{i}].subsets[{j}]: {option} with ControlNet: the conditioning "
                    f"image is cut at the target's centred crop, so a crop drawn each step would misalign the "
                    f"pair (the reference refuses random_crop here too); drop {option} for this subset"
                )
