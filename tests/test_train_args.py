"""flux_train_network.py command line: the reference's flags parse, refused flags and bad values fail naming the flag."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fluxpipe.config.reference_flags import (
    CHANGED_DEFAULTS,
    IGNORED_FOR_FLUX,
    REJECTED,
    build_parser,
    namespace_to_dict,
    parse_train_args,
)
from fluxpipe.errors import FluxpipeError

SEED = (
    "--pretrained_model_name_or_path flux1-dev.safetensors --clip_l clip_l.safetensors "
    "--t5xxl t5xxl_fp16.safetensors --ae ae.safetensors --dataset_config my_flux_dataset_config.toml "
    "--output_dir ./output --output_name my_flux_lora --save_model_as safetensors "
    "--network_module networks.lora_flux --network_dim 16 --network_alpha 1 --learning_rate 1e-4 "
    "--optimizer_type AdamW8bit --lr_scheduler constant --sdpa --max_train_epochs 10 --save_every_n_epochs 1 "
    "--mixed_precision fp16 --gradient_checkpointing --guidance_scale 1.0 --timestep_sampling flux_shift "
    "--model_prediction_type raw --blocks_to_swap 18 --cache_text_encoder_outputs --cache_latents"
).split()
BASE = ["--network_module", "networks.lora_flux"]


def fails(argv: list[str], match: str) -> None:
    with pytest.raises(FluxpipeError, match=match):
        parse_train_args(argv)


def test_seed_command_parses_with_typed_values() -> None:
    args = namespace_to_dict(parse_train_args(SEED))
    assert args["pretrained_model_name_or_path"] == "flux1-dev.safetensors"
    assert args["dataset_config"] == "my_flux_dataset_config.toml"  # a Path in the namespace, plain str here
    assert args["network_dim"] == 16 and isinstance(args["network_dim"], int)
    assert args["network_alpha"] == 1.0 and isinstance(args["network_alpha"], float)
    assert args["learning_rate"] == pytest.approx(1e-4)
    assert (args["optimizer_type"], args["lr_scheduler"], args["mixed_precision"]) == ("AdamW8bit", "constant", "fp16")
    assert (args["max_train_epochs"], args["save_every_n_epochs"], args["blocks_to_swap"]) == (10, 1, 18)
    assert args["guidance_scale"] == 1.0 and args["timestep_sampling"] == "flux_shift"
    assert args["model_prediction_type"] == "raw"
    assert args["gradient_checkpointing"] and args["cache_text_encoder_outputs"] and args["cache_latents"]
    assert args["sdpa"] and not args["fp8_base"] and args["v2"] is False
    assert args["max_train_steps"] == 1600 and args["save_model_as"] == "safetensors"
    assert args["optimizer_args"] is None and args["network_args"] is None


def test_list_flags_and_parser_settings() -> None:
    args = parse_train_args(
        BASE
        + [
            "--network_args",
            "train_blocks=single",
            "split_qkv=True",
            "--text_encoder_lr",
            "1e-5",
            "2e-5",
            "--optimizer_args",
            "weight_decay=0.01",
        ]
    )
    assert args.network_args == ["train_blocks=single", "split_qkv=True"]
    assert args.text_encoder_lr == [1e-5, 2e-5]
    assert args.optimizer_args == ["weight_decay=0.01"]
    assert build_parser().allow_abbrev is False


def test_changed_defaults_are_the_parser_defaults() -> None:
    parser, args = build_parser(), parse_train_args(BASE)
    assert set(CHANGED_DEFAULTS) == {"--timestep_sampling", "--model_prediction_type", "--guidance_scale"}
    for flag, (reference, ours, reason) in CHANGED_DEFAULTS.items():
        assert parser.get_default(flag[2:]) == ours == getattr(args, flag[2:]) != reference and reason


def test_reference_defaults_elsewhere() -> None:
    args = parse_train_args(BASE)
    assert (args.learning_rate, args.max_train_steps, args.lr_scheduler, args.huber_schedule) == (
        2e-6,
        1600,
        "constant",
        "snr",
    )
    assert (args.discrete_flow_shift, args.mode_scale, args.network_alpha, args.caption_extension) == (
        3.0,
        1.29,
        1,
        ".caption",
    )
    assert args.optimizer_type == "AdamW"  # "" resolved as the reference does
    assert args.blocks_to_swap is None and args.save_precision is None and args.mixed_precision == "no"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--v2"], "--v2: SD-only"),
        (["--v_parameterization"], "--v_parameterization: SD-only"),
        (["--clip_skip", "2"], "--clip_skip: SD-only"),
        (["--max_token_length", "225"], "--max_token_length: .*use --t5xxl_max_token_length"),
    ],
)
def test_rejected_flags(argv: list[str], message: str) -> None:
    assert argv[0][2:] in REJECTED
    fails(BASE + argv, message)


def test_unknown_and_abbreviated_flags_are_named_without_exiting() -> None:
    fails(BASE + ["--netwrk_dim", "4"], "unrecognized arguments: --netwrk_dim")
    fails(BASE + ["--network_d", "4"], "--network_d")
    fails(BASE + ["--network_dim", "four"], "--network_dim: invalid int value")


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--blocks_to_swap", "36"], "--blocks_to_swap"),
        (["--blocks_to_swap", "-1"], "--blocks_to_swap"),
        (["--blocks_to_swap", "8", "--cpu_offload_checkpointing"], "--blocks_to_swap.*cpu_offload_checkpointing"),
        (["--timestep_sampling", "logit_normal"], "--timestep_sampling"),
        (["--model_prediction_type", "eps"], "--model_prediction_type"),
        (["--loss_type", "l3"], "--loss_type"),
        (["--huber_schedule", "linear"], "--huber_schedule"),
        (["--loss_type", "huber"], "--huber_schedule: snr"),  # the reference default schedule cannot serve FLUX
        (["--mixed_precision", "fp8"], "--mixed_precision"),
        (["--save_precision", "fp32"], "--save_precision"),
        (["--lr_scheduler", "cosine_annealing"], "--lr_scheduler"),
        (["--optimizer_type", "AdamW9bit"], "--optimizer_type"),
        (["--save_model_as", "ckpt"], "--save_model_as.*never pickle"),
        (["--save_model_as", "pt"], "--save_model_as"),
        (["--lr_warmup_steps", "1.5"], "--lr_warmup_steps"),
        (["--lr_warmup_steps", "-3"], "--lr_warmup_steps"),
        (["--lr_warmup_steps", "10"], "--lr_warmup_steps: --lr_scheduler constant takes no warmup"),
        (["--max_train_steps", "0"], "--max_train_steps"),
        (["--max_train_epochs", "0"], "--max_train_epochs"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
        (["--fused_backward_pass"], "--fused_backward_pass: needs --optimizer_type Adafactor"),
        (
            ["--fused_backward_pass", "--optimizer_type", "adafactor", "--gradient_accumulation_steps", "2"],
            "--fused_backward_pass: cannot be combined",
        ),
        (["--t5xxl_max_token_length", "0"], "--t5xxl_max_token_length"),
        (["--t5xxl_max_token_length", "513"], "--t5xxl_max_token_length"),
        (["--use_8bit_adam", "--optimizer_type", "Lion"], "--optimizer_type"),
        (["--full_bf16", "--mixed_precision", "fp16"], "--full_bf16"),
        (["--model_type", "sd3"], "--model_type"),
    ],
)
def test_invalid_values_name_the_flag(argv: list[str], flag: str) -> None:
    fails(BASE + argv, flag)


@pytest.mark.parametrize("module", [None, "networks.oft_flux"])
def test_network_module_must_be_lora_flux(module: str | None) -> None:
    fails([] if module is None else ["--network_module", module], "--network_module")


def test_fluxpipe_alias_and_implied_flags() -> None:
    args = parse_train_args(
        [
            "--network_module",
            "fluxpipe.lora.network",
            "--cache_latents_to_disk",
            "--cache_text_encoder_outputs_to_disk",
            "--fp8_base_unet",
            "--caption_extention",
            ".txt",
        ]
    )
    assert args.network_module == "networks.lora_flux"
    assert args.cache_latents and args.cache_text_encoder_outputs and args.fp8_base
    assert (args.caption_extension, args.caption_extention) == (".txt", None)


@pytest.mark.parametrize("value, expected", [("10", 10), ("0.1", 0.1), ("5%", 0.05), ("0", 0.0)])
def test_warmup_int_or_fraction(value: str, expected: float) -> None:
    args = parse_train_args(BASE + ["--lr_scheduler", "cosine", "--lr_warmup_steps", value])
    assert args.lr_warmup_steps == pytest.approx(expected) and type(args.lr_warmup_steps) is type(expected)


@pytest.mark.parametrize(
    "given, canonical",
    [
        ("adamw8bit", "AdamW8bit"),
        ("PRODIGY", "Prodigy"),
        ("adafactor", "Adafactor"),
        ("dadaptadam", "DAdaptAdam"),
        ("sgd", "SGD"),
        ("bitsandbytes.optim.AdEMAMix8bit", "bitsandbytes.optim.AdEMAMix8bit"),
    ],
)
def test_optimizer_names_are_canonical(given: str, canonical: str) -> None:
    assert parse_train_args(BASE + ["--optimizer_type", given]).optimizer_type == canonical
    assert parse_train_args(BASE + ["--use_8bit_adam"]).optimizer_type == "AdamW8bit"
    assert parse_train_args(BASE + ["--use_lion_optimizer"]).optimizer_type == "Lion"


CONFIG = """\
[model_arguments]
pretrained_model_name_or_path = "flux1-dev.safetensors"
network_module = "networks.lora_flux"
dataset_config = "data.toml"

[training_arguments]
network_dim = 8
network_alpha = 4
learning_rate = 1e-3
optimizer_type = "prodigy"
optimizer_args = ["weight_decay=0.01", "d_coef=2"]
lr_scheduler = "cosine"
lr_warmup_steps = "10%"
cache_latents = true
resolution = 1024
"""


def test_config_file_sections_are_flattened_and_the_command_line_wins(tmp_path: Path) -> None:
    path = tmp_path / "train.toml"
    path.write_text(CONFIG)
    args = parse_train_args(["--config_file", str(path), "--network_dim", "32"])
    assert args.network_dim == 32  # command line over TOML
    assert (args.network_alpha, args.learning_rate, args.optimizer_type) == (4.0, 1e-3, "Prodigy")
    assert args.optimizer_args == ["weight_decay=0.01", "d_coef=2"] and args.cache_latents
    assert args.lr_warmup_steps == pytest.approx(0.1) and args.resolution == "1024"
    assert args.dataset_config == Path("data.toml") and args.timestep_sampling == "flux_shift"
    assert parse_train_args(["--config_file", str(tmp_path / "train")]).network_dim == 8  # ".toml" appended


@pytest.mark.parametrize(
    "extra, message",
    [
        ("netwrk_dim = 4", r"train.toml: unknown key 'netwrk_dim' in \[more\]"),
        ('max_train_epochs = "four"', "train.toml: max_train_epochs: 'four' is not a valid int"),
        ("gradient_checkpointing = 1", "train.toml: gradient_checkpointing: 1 must be true or false"),
        ("learning_rate = 2e-4", "train.toml: key 'learning_rate' is set twice"),
        ("v2 = true", "--v2: SD-only"),
        ("blocks_to_swap = 40", "--blocks_to_swap"),
    ],
)
def test_config_file_errors_name_key_and_file(tmp_path: Path, extra: str, message: str) -> None:
    path = tmp_path / "train.toml"
    path.write_text(CONFIG + "\n[more]\n" + extra + "\n")
    fails(["--config_file", str(path)], message)


def test_config_file_missing_or_broken(tmp_path: Path) -> None:
    fails(["--config_file", str(tmp_path / "absent.toml")], "--config_file .*absent.toml: cannot read")
    (tmp_path / "bad.toml").write_text("network_dim = = 4\n")
    fails(["--config_file", str(tmp_path / "bad.toml")], "bad.toml: not valid TOML")


def test_ignored_flags_are_accepted_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    parser = build_parser()
    for flag in IGNORED_FOR_FLUX:
        assert parser.get_default(flag[2:]) in (None, False, 0.3, "ddim"), flag
    argv = BASE + [
        "--noise_offset",
        "0.1",
        "--min_snr_gamma",
        "5",
        "--xformers",
        "--sample_sampler",
        "euler_a",
        "--vae",
        "ae.safetensors",
        "--zero_terminal_snr",
        "--min_timestep",
        "100",
    ]
    with caplog.at_level(logging.WARNING, logger="fluxpipe.config.reference_flags"):
        args = parse_train_args(argv)
    assert args.noise_offset == 0.1 and args.xformers and args.sample_sampler == "euler_a"
    assert "ignored for FLUX" in caplog.text and "--noise_offset" in caplog.text and "--xformers" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fluxpipe.config.reference_flags"):
        parse_train_args(BASE)
    assert "ignored" not in caplog.text


def test_namespace_to_dict_is_plain() -> None:
    values = namespace_to_dict(parse_train_args(BASE + ["--dataset_config", "d.toml", "--base_weights", "a", "b"]))
    assert values["dataset_config"] == "d.toml" and values["base_weights"] == ["a", "b"]
    assert all(isinstance(v, str | int | float | bool | list | type(None)) for v in values.values())
    assert "help" not in values and len(values) > 150


def test_the_training_doc_lists_every_ignored_flag() -> None:
    readme = (Path(__file__).resolve().parents[1] / "docs/methods.md").read_text()
    section = readme[readme.index("Accepted and ignored for FLUX") : readme.index("**Memory options.**")]
    assert [f for f in IGNORED_FOR_FLUX if f"`{f}`" not in section] == []


def test_split_mode_means_blocks_to_swap_18(caplog: pytest.LogCaptureFixture) -> None:
    """The reference maps the deprecated --split_mode to --blocks_to_swap 18 with a warning (LoRA script only)."""
    with caplog.at_level(logging.WARNING, logger="fluxpipe.config.reference_flags"):
        args = parse_train_args(BASE + ["--split_mode"])
    assert args.blocks_to_swap == 18 and args.split_mode is False
    assert "--split_mode is deprecated: use --blocks_to_swap" in caplog.text
    assert parse_train_args(BASE + ["--split_mode", "--blocks_to_swap", "4"]).blocks_to_swap == 4
    fails(BASE + ["--split_mode", "--cpu_offload_checkpointing"], "--blocks_to_swap.*cpu_offload_checkpointing")
    with pytest.raises(FluxpipeError, match="--split_mode: is a .*LoRA script only: use --blocks_to_swap"):
        parse_train_args(["--split_mode"], "full")


def test_highvram_and_dataset_flags_are_accepted() -> None:
    from fluxpipe.commands.train import check_unhonoured

    argv = BASE + [
        "--highvram",
        "--train_batch_size",
        "3",
        "--caption_extension",
        "txt",
        "--resolution",
        "512,768",
        "--enable_bucket",
        "--min_bucket_reso",
        "128",
        "--resize_interpolation",
        "bicubic",
        "--train_data_dir",
        "img",
        "--reg_data_dir",
        "reg",
        "--flip_aug",
        "--dataset_repeats",
        "2",
    ]
    check_unhonoured(parse_train_args(argv))  # nothing refused
    with pytest.raises(FluxpipeError, match="--train_data_dir"):  # ControlNet folder mode is not built
        check_unhonoured(parse_train_args(["--train_data_dir", "img"], "controlnet"), "controlnet")


def test_dataset_flags_as_dataset_keys() -> None:
    from fluxpipe.config.reference_flags import dataset_flag_defaults, given_dataset_flags

    args = parse_train_args(
        BASE
        + [
            "--train_batch_size",
            "3",
            "--caption_extension",
            ".txt",
            "--resolution",
            "512",
            "--face_crop_aug_range",
            "2,4",
            "--dataset_repeats",
            "5",
            "--keep_tokens",
            "0",
        ]
    )
    assert dataset_flag_defaults(args) == {
        "batch_size": 3,
        "caption_extension": ".txt",
        "resolution": (512, 512),
        "face_crop_aug_range": (2.0, 4.0),
        "num_repeats": 5,
    }
    assert given_dataset_flags(args) == [
        "--train_batch_size",
        "--dataset_repeats",
        "--resolution",
        "--caption_extension",
        "--face_crop_aug_range",
    ]
    assert dataset_flag_defaults(parse_train_args(BASE + ["--resolution", "768,512"])) == {"resolution": (768, 512)}
    fails(BASE + ["--resolution", "512x512"], "--resolution '512x512': write SIZE or W,H")
    fails(BASE + ["--resolution", "1,2,3"], "--resolution")
    fails(BASE + ["--face_crop_aug_range", "2"], "--face_crop_aug_range '2': write LOW,HIGH")


def test_load_datasets_applies_command_line_fallbacks(tmp_path: Path) -> None:
    from fluxpipe.commands.train import load_datasets

    toml = tmp_path / "d.toml"
    toml.write_text("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'img'\n")
    (ds,) = load_datasets(
        parse_train_args(
            BASE + ["--dataset_config", str(toml), "--train_batch_size", "3", "--caption_extension", ".txt"]
        )
    ).datasets
    assert ds.batch_size == 3 and ds.subsets[0].caption_extension == ".txt"
    (tmp_path / "train" / "4_sks cat").mkdir(parents=True)
    (ds,) = load_datasets(
        parse_train_args(BASE + ["--train_data_dir", str(tmp_path / "train"), "--resolution", "256", "--enable_bucket"])
    ).datasets
    assert ds.resolution == (256, 256) and ds.enable_bucket and ds.batch_size == 1
    assert [(s.num_repeats, s.class_tokens, s.is_reg) for s in ds.subsets] == [(4, "sks cat", False)]
    with pytest.raises(FluxpipeError, match="--train_data_dir needs --resolution"):
        load_datasets(parse_train_args(BASE + ["--train_data_dir", str(tmp_path / "train")]))
    with pytest.raises(FluxpipeError, match="no dataset: give --dataset_config"):
        load_datasets(parse_train_args(BASE))


def test_pipeline_train_sections_refuse_dataset_flags() -> None:
    from fluxpipe.config.pipeline import ConfigError, load_pipeline

    with pytest.raises(ConfigError, match="train: train_batch_size are dataset settings: set them in the dataset "):
        load_pipeline({"train": {"network_module": "networks.lora_flux", "train_batch_size": 2}})
