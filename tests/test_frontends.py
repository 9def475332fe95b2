"""Front-ends' command lines run unchanged: FluxGym's three train.sh presets, the reference's folder mode."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest
from conftest import REPO
from PIL import Image
from safetensors import safe_open

from fluxpipe.cli import main
from fluxpipe.commands.train import check_supported
from fluxpipe.config.reference_flags import parse_train_args
from fluxpipe.io.tables import read_parquet
from fluxpipe.tools.demo import CLIP_DIR, FILES, T5_DIR

# FluxGym's app.py gen_sh (cocktailpeanut/fluxgym 678add2) with its default settings (workers 2, seed 42,
# learning rate 8e-4, network_dim 4, 16 epochs, save every 4, timestep_sampling shift, guidance 1): the text
# verbatim, {placeholders} for its model, dataset and output paths and for the per-preset optimizer block.
FLUXGYM_SH = """accelerate launch \\
  --mixed_precision bf16 \\
  --num_cpu_threads_per_process 1 \\
  sd-scripts/flux_train_network.py \\
  --pretrained_model_name_or_path {flux} \\
  --clip_l {clip_l} \\
  --t5xxl {t5xxl} \\
  --ae {ae} \\
  --cache_latents_to_disk \\
  --save_model_as safetensors \\
  --sdpa --persistent_data_loader_workers \\
  --max_data_loader_n_workers 2 \\
  --seed 42 \\
  --gradient_checkpointing \\
  --mixed_precision bf16 \\
  --save_precision bf16 \\
  --network_module networks.lora_flux \\
  --network_dim 4 \\
  {optimizer}
  --learning_rate 8e-4 \\
  --cache_text_encoder_outputs \\
  --cache_text_encoder_outputs_to_disk \\
  --fp8_base \\
  --highvram \\
  --max_train_epochs 16 \\
  --save_every_n_epochs 4 \\
  --dataset_config {dataset} \\
  --output_dir {output} \\
  --output_name my-lora \\
  --timestep_sampling shift \\
  --discrete_flow_shift 3.1582 \\
  --model_prediction_type raw \\
  --guidance_scale 1 \\
  --loss_type l2 \\"""
OPTIMIZERS = {
    "16G": """--optimizer_type adafactor \\
  --optimizer_args "relative_step=False" "scale_parameter=False" "warmup_init=False" \\
  --lr_scheduler constant_with_warmup \\
  --max_grad_norm 0.0 \\""",
    "12G": """--optimizer_type adafactor \\
  --optimizer_args "relative_step=False" "scale_parameter=False" "warmup_init=False" \\
  --split_mode \\
  --network_args "train_blocks=single" \\
  --lr_scheduler constant_with_warmup \\
  --max_grad_norm 0.0 \\""",
    "20G": "--optimizer_type adamw8bit \\",
}
# FluxGym's gen_toml, verbatim but for the folder, the class tokens and num_repeats (its default is 10)
FLUXGYM_TOML = """[general]
shuffle_caption = false
caption_extension = '.txt'
keep_tokens = 1

[[datasets]]
resolution = 512
batch_size = 1
keep_tokens = 1

  [[datasets.subsets]]
  image_dir = '{folder}'
  class_tokens = 'sks object'
  num_repeats = 1"""


def fluxgym_argv(vram: str, demo: Path, out: Path, dataset: Path) -> list[str]:
    """The flux_train_network.py flags of FluxGym's train.sh for one VRAM preset, paths pointed at the demo."""
    sh = FLUXGYM_SH.format(
        flux=demo / FILES["flux"],
        clip_l=demo / FILES["clip_l"],
        t5xxl=demo / FILES["t5xxl"],
        ae=demo / FILES["ae"],
        dataset=dataset,
        output=out,
        optimizer=OPTIMIZERS[vram],
    )
    words = shlex.split(sh.replace("\\\n", " ").rstrip("\\"))
    return words[words.index("sd-scripts/flux_train_network.py") + 1 :]


def fluxgym_dataset(tmp: Path, images: int) -> Path:
    folder = tmp / "datasets" / "my-lora"
    folder.mkdir(parents=True)
    for name in ("cat", "coffee", "brick")[:images]:
        for suffix in (".jpg", ".txt"):
            shutil.copy(REPO / "config/demo/images" / f"{name}{suffix}", folder)
    path = tmp / "dataset.toml"
    path.write_text(FLUXGYM_TOML.format(folder=folder))
    return path


@pytest.mark.parametrize("vram", ["16G", "12G", "20G"])
def test_fluxgym_presets_parse(vram: str, tmp_path: Path, demo_dir: Path) -> None:
    ns = parse_train_args(fluxgym_argv(vram, demo_dir, tmp_path / "out", tmp_path / "dataset.toml"))
    check_supported(ns, "cpu")  # nothing refused
    assert ns.highvram and ns.fp8_base and ns.cache_latents and ns.cache_text_encoder_outputs
    assert (ns.network_dim, ns.learning_rate, ns.max_train_epochs, ns.seed) == (4, 8e-4, 16, 42)
    assert ns.optimizer_type == ("AdamW8bit" if vram == "20G" else "Adafactor")
    assert ns.blocks_to_swap == (18 if vram == "12G" else None)  # --split_mode, as the reference maps it
    assert ns.network_args == (["train_blocks=single"] if vram == "12G" else None)


def test_fluxgym_12g_preset_trains_on_the_demo(tmp_path: Path, demo_dir: Path) -> None:
    """The 12 GB preset (split_mode, single blocks only, Adafactor, fp8 base), 1 epoch of 2 images."""
    argv = fluxgym_argv("12G", demo_dir, tmp_path / "out", fluxgym_dataset(tmp_path, 2))
    assert (
        main(
            [
                "train",
                "lora",
                *argv,
                "--max_train_epochs",
                "1",
                "--clip_tokenizer",
                str(demo_dir / CLIP_DIR),
                "--t5_tokenizer",
                str(demo_dir / T5_DIR),
            ]
        )
        == 0
    )
    with safe_open(str(tmp_path / "out/my-lora.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["ss_steps"] == "2" and meta["ss_fp8_base"] == "True"  # 2 images x 1 repeat / batch 1
    unet = {k for k in keys if k.startswith("lora_unet_")}
    assert unet and all(k.startswith("lora_unet_single_blocks_") for k in unet)  # train_blocks=single


def test_folder_mode_trains_with_command_line_batch_and_captions(tmp_path: Path, demo_dir: Path) -> None:
    """--train_data_dir with an N_concept folder, --resolution, --train_batch_size, --caption_extension: 4 images
    x 2 repeats / batch 2 = 4 steps (not 8); an image without a caption file is captioned with the class token."""
    concept = tmp_path / "train" / "2_sks photo"
    concept.mkdir(parents=True)
    for i, color in enumerate(("red", "green", "blue", "white")):
        Image.new("RGB", (64, 64), color).save(concept / f"{color}.png")
        if i < 3:
            (concept / f"{color}.cap").write_text(f"a {color} square")
    (tmp_path / "train" / "readme").mkdir()  # no repeat count: left out
    out = tmp_path / "out"
    argv = [
        "--pretrained_model_name_or_path",
        str(demo_dir / FILES["flux"]),
        "--clip_l",
        str(demo_dir / FILES["clip_l"]),
        "--t5xxl",
        str(demo_dir / FILES["t5xxl"]),
        "--ae",
        str(demo_dir / FILES["ae"]),
        "--network_module",
        "networks.lora_flux",
        "--network_train_unet_only",
        "--train_data_dir",
        str(tmp_path / "train"),
        "--resolution",
        "64",
        "--train_batch_size",
        "2",
        "--caption_extension",
        "cap",
        "--max_train_epochs",
        "1",
        "--output_dir",
        str(out),
        "--clip_tokenizer",
        str(demo_dir / CLIP_DIR),
        "--t5_tokenizer",
        str(demo_dir / T5_DIR),
    ]
    assert main(["train", "lora", *argv]) == 0
    with safe_open(str(out / "last.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "4"
    table, _ = read_parquet(out / ".fluxpipe-cache/dataset/manifest.parquet")
    assert sorted(table.caption) == ["a blue square", "a green square", "a red square", "sks photo"]
    assert set(table.repeats) == {2} and not table.is_reg.any()


def test_refused_dataset_settings_stop_before_any_work(
    tmp_path: Path, demo_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = fluxgym_argv("20G", demo_dir, tmp_path / "out", fluxgym_dataset(tmp_path, 1))
    assert main(["train", "lora", *argv, "--cache_info"]) == 2
    assert "cache_info: not supported" in capsys.readouterr().err and not (tmp_path / "out").exists()
