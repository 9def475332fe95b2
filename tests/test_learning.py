"""Learning as a test: what training learns, the official sampler must reproduce.

A full fine-tune on one image, then a LoRA on another image over that fine-tuned DiT, both with the seed's
settings (flux_shift, raw, guidance 1.0); the official sampler (``fluxpipe.inference.sampler``, as `fluxpipe sample`
runs it), started from several seeds, must end near the trained image's latent, and the model before training
must not. The error is ||z - x0||² / ||noise - x0||² (1 = no closer than the starting noise).

A sign error in the target, a time convention that differs between training and the sampler, or a LoRA that
sampling does not apply each fails these tests (docs/evaluation.md, "Learning test", lists the figures).

The demo AE is random: its posterior is wide (std ≈ 1) and its latents small (std ≈ 0.13), so every image
would be nearly the same latent plus noise. The copy used here has a narrow posterior and latents of std
≈ 0.5 (the encoder's last convolution edited), so that the two images are far apart, as with the real AE.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO
from PIL import Image
from safetensors.torch import load_file, save_file

from fluxpipe.cli import main
from fluxpipe.tools.demo import CLIP_DIR, FILES, T5_DIR

CAPTIONS = {"cat": "a close-up photo of a tabby cat", "rocket": "a rocket launching into a clear blue sky at dawn"}
SEEDS = (0, 1, 2)
T5_LENGTH = 16
NEAR, FAR = 0.1, 0.2  # error bounds: a trained model ends within NEAR, the untrained one beyond FAR


@pytest.fixture(scope="module")
def world(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo models (AE narrowed, see the module's note) and two one-image datasets at 64 px."""
    root = tmp_path_factory.mktemp("learning")
    models = root / "models"
    shutil.copytree(demo_dir, models)
    ae = load_file(str(demo_dir / FILES["ae"]))
    w, b = ae["encoder.conv_out.weight"], ae["encoder.conv_out.bias"]
    w[:16] *= 4.0  # the mean: latent std ≈ 0.5
    b[:16] *= 4.0
    w[16:] = 0.0  # the log-variance: -20, posterior std ≈ 5e-5
    b[16:] = -20.0
    save_file(ae, str(models / FILES["ae"]))
    for name, caption in CAPTIONS.items():
        folder = root / name
        folder.mkdir()
        Image.open(REPO / f"config/demo/images/{name}.jpg").convert("RGB").resize((64, 64)).save(folder / "x.png")
        (folder / "x.txt").write_text(caption + "\n")
        (root / f"{name}.toml").write_text(
            '[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\nbatch_size = 4\n'
            f'enable_bucket = false\n  [[datasets.subsets]]\n  image_dir = "{folder}"\n  num_repeats = 4\n'
        )
    return root


def common(world: Path, base: Path, name: str, out: Path, lr: str, steps: int) -> list[str]:
    m = world / "models"
    return [
        "--pretrained_model_name_or_path",
        str(base),
        "--clip_l",
        str(m / FILES["clip_l"]),
        "--t5xxl",
        str(m / FILES["t5xxl"]),
        "--ae",
        str(m / FILES["ae"]),
        "--dataset_config",
        str(world / f"{name}.toml"),
        "--output_dir",
        str(out),
        "--output_name",
        "out",
        "--learning_rate",
        lr,
        "--optimizer_type",
        "AdamW",
        "--max_train_steps",
        str(steps),
        "--seed",
        "0",
        "--guidance_scale",
        "1.0",
        "--timestep_sampling",
        "flux_shift",
        "--model_prediction_type",
        "raw",
        "--cache_text_encoder_outputs",
        "--cache_latents",
        "--t5xxl_max_token_length",
        str(T5_LENGTH),
        "--clip_tokenizer",
        str(m / CLIP_DIR),
        "--t5_tokenizer",
        str(m / T5_DIR),
    ]


def image_latent(world: Path, name: str) -> torch.Tensor:
    """The training target: the AE posterior's mean, scaled and shifted as FLUX.1's latents are."""
    from fluxpipe.data.images import load_rgb, to_tensor
    from fluxpipe.io.checkpoints import load_model
    from fluxpipe.models.autoencoder import FLUX1_AE

    ae = load_model(world / "models" / FILES["ae"], "ae", dtype=torch.float32)
    with torch.no_grad():
        mean = ae.encoder(to_tensor(load_rgb(world / name / "x.png"))[None]).chunk(2, dim=1)[0]
    return FLUX1_AE.scale_factor * (mean - FLUX1_AE.shift_factor)


def sample_errors(world: Path, flux: Path, name: str, lora: Path | None = None) -> list[float]:
    """||z - x0||² / ||noise - x0||² of the official sampler's latent for the image's caption, per seed."""
    from fluxpipe.data.prompts import SamplePrompt
    from fluxpipe.inference.sampler import ModelFiles, encode_texts, load_sampler, read_loras
    from fluxpipe.maths.sampling import get_noise

    m = world / "models"
    files = ModelFiles(
        flux=flux,
        ae=m / FILES["ae"],
        clip_l=m / FILES["clip_l"],
        t5xxl=m / FILES["t5xxl"],
        clip_tokenizer=m / CLIP_DIR,
        t5_tokenizer=m / T5_DIR,
    )
    caption, x0 = CAPTIONS[name], image_latent(world, name)
    cond = encode_texts(
        files, [caption], device="cpu", dtype=torch.float32, max_length=T5_LENGTH, apply_t5_attn_mask=False
    )[caption]
    sampler = load_sampler(files, device="cpu", dtype=torch.float32, loras=read_loras([(lora, 1.0)] if lora else []))
    errors = []
    for seed in SEEDS:
        prompt = SamplePrompt(index=0, prompt=caption, width=64, height=64, seed=seed, steps=20, guidance=1.0)
        z = sampler.latents(prompt, cond, None, seed)
        noise = get_noise(1, 64, 64, seed, "cpu", torch.float32)
        errors.append(float(((z - x0) ** 2).sum() / ((noise - x0) ** 2).sum()))
    return errors


@pytest.fixture(scope="module")
def fine_tuned(world: Path) -> Path:
    """The demo DiT fully fine-tuned on the cat (300 steps of 4, AdamW 2e-3), saved in fp32."""
    out = world / "full"
    args = common(world, world / "models" / FILES["flux"], "cat", out, "2e-3", 300)
    assert main(["train", "full", *args, "--save_precision", "float"]) == 0
    return out / "out.safetensors"


def test_a_full_fine_tune_samples_its_image(world: Path, fine_tuned: Path) -> None:
    before = sample_errors(world, world / "models" / FILES["flux"], "cat")
    after = sample_errors(world, fine_tuned, "cat")
    print(f"full fine-tune, cat: before {before}, after {after}")
    assert min(before) > FAR, before
    assert max(after) <= NEAR, after


def test_a_lora_samples_its_image_and_its_base_does_not(world: Path, fine_tuned: Path) -> None:
    out = world / "lora"
    args = common(world, fine_tuned, "rocket", out, "3e-3", 200)
    args += [
        "--network_module",
        "networks.lora_flux",
        "--network_dim",
        "16",
        "--network_alpha",
        "16",
        "--network_train_unet_only",
    ]
    assert main(["train", "lora", *args]) == 0
    base = sample_errors(world, fine_tuned, "rocket")
    with_lora = sample_errors(world, fine_tuned, "rocket", out / "out.safetensors")
    print(f"LoRA, rocket: base {base}, with the LoRA {with_lora}")
    assert min(base) > FAR, base
    assert max(with_lora) <= NEAR, with_lora
