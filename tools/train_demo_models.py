"""Train tiny demo models on a procedural world of coloured shapes (issue 17, item 1; WORK IN PROGRESS).

    python tools/train_demo_models.py OUT [--seed 0] [--ae-steps 600] [--dit-steps 3000] [--images 192]

1. writes the random demo models (``fluxpipe.tools.demo.write_demo_models``: tokenizers and text encoders are kept);
2. trains the tiny AE (FLUX.1's AutoEncoder at width 32) to reconstruct 32 px crops of the world's images
   (MSE + a small KL, and a term that keeps the normalised latents near zero mean and unit variance, as FLUX.1's);
3. renders the captioned world at 64 px into OUT/world/ and fully fine-tunes the tiny DiT on it with
   fluxpipe's own trainer (`fluxpipe train full`, flux_shift, raw, guidance 1.0);
4. leaves OUT/models/ (the demo layout) with the trained ae.safetensors and flux1-dev.safetensors (bf16).

Reproducible from --seed (CPU, one thread). Not yet wired into `fluxpipe demo-models`; see the report of
issue 17 for what remains.
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

import torch
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")


def draw(shape: str, color: str, background: str, size: int, rng: random.Random) -> Image.Image:
    """One image: a shape of ``color`` (side 40-60 % of the image, jittered position) on ``background``."""
    image = Image.new("RGB", (size, size), COLORS[background])
    pen = ImageDraw.Draw(image)
    side = rng.uniform(0.4, 0.6) * size
    x0, y0 = rng.uniform(0.1 * size, 0.9 * size - side), rng.uniform(0.1 * size, 0.9 * size - side)
    box = (x0, y0, x0 + side, y0 + side)
    if shape == "circle":
        pen.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        pen.rectangle(box, fill=COLORS[color])
    else:
        pen.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=COLORS[color])
    return image


def world(n: int, size: int, seed: int, shapes: tuple[str, ...] = SHAPES) -> list[tuple[Image.Image, str]]:
    """n (image, caption) pairs, e.g. 'a red circle on a blue background'; every combination in turn."""
    rng = random.Random(seed)
    combos = [(s, c, b) for s in shapes for c in COLORS for b in COLORS if b != c]
    rng.shuffle(combos)
    out = []
    for i in range(n):
        s, c, b = combos[i % len(combos)]
        out.append((draw(s, c, b, size, rng), f"a {c} {s} on a {b} background"))
    return out


def train_ae(ae_file: Path, steps: int, seed: int, batch: int = 8, crop: int = 32) -> None:
    """Train the AE in ``ae_file`` (overwritten, fp32) on random crops of freshly drawn world images."""
    from fluxpipe.data.images import to_tensor
    from fluxpipe.io.checkpoints import load_model
    from fluxpipe.io.safetensors_file import save_safetensors

    torch.manual_seed(seed)
    rng = random.Random(seed + 1)
    ae = load_model(ae_file, "ae", dtype=torch.float32).train().requires_grad_(True)
    opt = torch.optim.AdamW(ae.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(steps):
        images = [img for img, _ in world(batch, 2 * crop, rng.randrange(1 << 30))]
        x = torch.stack(
            [
                to_tensor(img.crop((o := rng.randrange(crop + 1), p := rng.randrange(crop + 1), o + crop, p + crop)))
                for img in images
            ]
        )
        mean, logvar = ae.encoder(x).chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        recon = ae.decoder(z)
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
        scaled = ae.normalize(mean)
        stats = scaled.mean() ** 2 + (scaled.var() - 1) ** 2
        loss = ((recon - x) ** 2).mean() + 1e-4 * kl + 1e-2 * stats
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(
                f"ae step {step}: loss {loss.item():.4f} (kl {kl.item():.3f}, latent var {scaled.var().item():.2f})",
                flush=True,
            )
    save_safetensors(
        {k: v.detach().contiguous() for k, v in ae.state_dict().items()},
        ae_file,
        metadata={"fluxpipe.tools.demo": f"tiny AE trained on the shapes world, seed {seed}, {steps} steps"},
    )


def write_world(folder: Path, n: int, seed: int) -> Path:
    """The world's images and captions in ``folder``, and a dataset TOML for them (64 px, no buckets)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, caption) in enumerate(world(n, 64, seed)):
        image.save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(caption + "\n")
    toml = folder.parent / "world.toml"
    toml.write_text(
        '[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\nbatch_size = 8\n'
        f'enable_bucket = false\n  [[datasets.subsets]]\n  image_dir = "{folder}"\n'
    )
    return toml


def train_dit(models: Path, toml: Path, out: Path, steps: int, seed: int, t5_length: int) -> Path:
    """`fluxpipe train full` of the demo DiT on the world; returns the saved DiT (bf16)."""
    from fluxpipe.cli import main
    from fluxpipe.tools.demo import CLIP_DIR, FILES, T5_DIR

    args = [
        "--pretrained_model_name_or_path",
        str(models / FILES["flux"]),
        "--clip_l",
        str(models / FILES["clip_l"]),
        "--t5xxl",
        str(models / FILES["t5xxl"]),
        "--ae",
        str(models / FILES["ae"]),
        "--dataset_config",
        str(toml),
        "--output_dir",
        str(out),
        "--output_name",
        "dit",
        "--learning_rate",
        "1e-3",
        "--optimizer_type",
        "AdamW",
        "--lr_scheduler",
        "cosine",
        "--max_train_steps",
        str(steps),
        "--seed",
        str(seed),
        "--guidance_scale",
        "1.0",
        "--timestep_sampling",
        "flux_shift",
        "--model_prediction_type",
        "raw",
        "--cache_text_encoder_outputs",
        "--cache_latents",
        "--save_precision",
        "bf16",
        "--t5xxl_max_token_length",
        str(t5_length),
        "--clip_tokenizer",
        str(models / CLIP_DIR),
        "--t5_tokenizer",
        str(models / T5_DIR),
    ]
    if main(["train", "full", *args]) != 0:
        raise SystemExit("train full failed")
    return out / "dit.safetensors"


def main() -> None:
    from fluxpipe.tools.demo import FILES, write_demo_models

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ae-steps", type=int, default=600)
    p.add_argument("--dit-steps", type=int, default=3000)
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--t5-length", type=int, default=32, help="T5 tokens in training (sample with the same)")
    p.add_argument("--ae", type=Path, help="an AE trained before by this script: used instead of training one")
    a = p.parse_args()
    torch.set_num_threads(1)
    models = a.out / "models"
    write_demo_models(models, seed=a.seed)
    if a.ae is not None:
        shutil.copy(a.ae, models / FILES["ae"])
    elif a.ae_steps:
        train_ae(models / FILES["ae"], a.ae_steps, a.seed)
    toml = write_world(a.out / "world", a.images, a.seed)
    dit = train_dit(models, toml, a.out / "train", a.dit_steps, a.seed, a.t5_length)
    dit.replace(models / FILES["flux"])


if __name__ == "__main__":
    main()
