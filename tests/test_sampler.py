"""The sampler: official noise, true CFG, pixel conversion, LoRAs attached and detached, `fluxpipe sample`,
and the evaluate stage's pieces (checkpoint discovery, labels)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fluxpipe.cli import main
from fluxpipe.data.prompts import SamplePrompt
from fluxpipe.inference.sampler import ModelFiles, Sampler, encode_texts, load_sampler, to_pil
from fluxpipe.maths.sampling import cfg_combine, denoise, get_noise
from fluxpipe.tools.demo import CLIP_DIR, FILES, T5_DIR


def test_noise_is_the_official_cpu_draw() -> None:
    noise = get_noise(2, 100, 260, seed=7, device="cpu", dtype=torch.bfloat16)
    # 2·ceil(100/16) = 14 rows, 2·ceil(260/16) = 34 columns; float32 from a CPU generator, then cast
    assert noise.shape == (2, 16, 14, 34) and noise.dtype == torch.bfloat16
    expected = torch.randn(2, 16, 14, 34, generator=torch.Generator("cpu").manual_seed(7))
    assert torch.equal(noise, expected.to(torch.bfloat16))
    assert not torch.equal(get_noise(1, 64, 64, 8, "cpu", torch.float32), get_noise(1, 64, 64, 7, "cpu", torch.float32))


@pytest.mark.gpu
def test_noise_is_the_same_on_the_gpu() -> None:
    assert torch.equal(
        get_noise(1, 1024, 768, 3, "cuda", torch.float32).cpu(), get_noise(1, 1024, 768, 3, "cpu", torch.float32)
    )


def test_cfg_combine_by_hand() -> None:
    assert torch.equal(cfg_combine(torch.tensor([1.0]), torch.tensor([3.0]), 2.5), torch.tensor([6.0]))  # 1 + 2.5·2


class TextVelocity(torch.nn.Module):
    """pred = mean of the text features per row (so positive and negative prompts give different velocities)."""

    def forward(self, img, img_ids, txt, txt_ids, y, timesteps, guidance):  # noqa: ANN001, ANN201
        assert img.shape[0] == txt.shape[0] == y.shape[0] == img_ids.shape[0] == txt_ids.shape[0]
        return torch.ones_like(img) * txt.mean(dim=(1, 2))[:, None, None]


def test_true_cfg_by_hand() -> None:
    img, ids = torch.zeros(1, 3, 4), torch.zeros(1, 3, 3)
    pos, neg, vec = torch.full((1, 2, 5), 2.0), torch.full((1, 2, 5), 0.5), torch.zeros(1, 4)
    out = denoise(
        TextVelocity(),
        img,
        ids,
        pos,
        torch.zeros(1, 2, 3),
        vec,
        [1.0, 0.0],
        3.5,
        negative=(neg, vec, None),
        cfg_scale=4.0,
    )
    # v = 0.5 + 4·(2 − 0.5) = 6.5; one Euler step from 1 to 0: x = 0 − 6.5
    assert torch.allclose(out, torch.full((1, 3, 4), -6.5))
    plain = denoise(
        TextVelocity(),
        img,
        ids,
        pos,
        torch.zeros(1, 2, 3),
        vec,
        [1.0, 0.0],
        3.5,
        negative=(neg, vec, None),
        cfg_scale=1.0,
    )  # scale 1: the negative prompt is not used
    assert torch.allclose(plain, torch.full((1, 3, 4), -2.0))


def test_pixels_as_the_official_conversion() -> None:
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0]).reshape(1, 1, 5).expand(3, 1, 5)
    image = to_pil(x)
    # 127.5·(x + 1) truncated: -1 -> 0, 0 -> 127, 0.5 -> 191, 1 -> 255 (clamped below -1)
    assert image.size == (5, 1) and [image.getpixel((i, 0))[0] for i in range(5)] == [0, 0, 127, 191, 255]


def files(demo: Path) -> ModelFiles:
    return ModelFiles(
        flux=demo / FILES["flux"],
        ae=demo / FILES["ae"],
        clip_l=demo / FILES["clip_l"],
        t5xxl=demo / FILES["t5xxl"],
        clip_tokenizer=demo / CLIP_DIR,
        t5_tokenizer=demo / T5_DIR,
    )


def random_lora(demo: Path, path: Path, scale: float = 0.5) -> Path:
    from fluxpipe.io.checkpoints import load_model
    from fluxpipe.lora.files import lora_targets

    dit = load_model(demo / FILES["flux"], "flux")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, linear in lora_targets(dit, "lora_unet").items():
        out_f, in_f = linear.weight.shape
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, in_f, generator=g) * scale
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_f, 4, generator=g) * scale
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path))
    return path


def test_sampler_images_are_seeded_and_loras_attach_and_detach(demo_dir: Path, tmp_path: Path) -> None:
    from fluxpipe.inference.sampler import read_loras
    from fluxpipe.lora.files import apply_lora, detach_loras

    p = SamplePrompt(index=0, prompt="a red cube", width=64, height=80, steps=3)
    conds = encode_texts(
        files(demo_dir), [p.prompt], device="cpu", dtype=torch.float32, max_length=32, apply_t5_attn_mask=False
    )
    sampler = load_sampler(files(demo_dir), device="cpu", dtype=torch.float32)
    a = sampler.latents(p, conds[p.prompt], None, seed=1)
    assert a.shape == (1, 16, 10, 8) and torch.equal(a, sampler.latents(p, conds[p.prompt], None, seed=1))
    assert not torch.equal(a, sampler.latents(p, conds[p.prompt], None, seed=2))
    image = sampler.image(p, conds[p.prompt], None, seed=1)
    assert image.size == (64, 80) and image.mode == "RGB"
    ((parts, _),) = read_loras([(random_lora(demo_dir, tmp_path / "l.safetensors"), 1.0)])
    apply_lora(sampler.dit, parts["lora_unet"], 0.7, merge=False)
    attached = sampler.latents(p, conds[p.prompt], None, seed=1)
    assert not torch.allclose(attached, a, atol=1e-4)
    assert detach_loras(sampler.dit) > 0 and torch.equal(sampler.latents(p, conds[p.prompt], None, seed=1), a)
    merged = load_sampler(files(demo_dir), device="cpu", dtype=torch.float32, loras=[(parts, 0.7)])
    assert torch.allclose(merged.latents(p, conds[p.prompt], None, seed=1), attached, rtol=1e-4, atol=1e-4)
    assert isinstance(merged, Sampler)


def test_sample_command_writes_the_png(demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "models:\n"
        + "".join(f"  {k}: {demo_dir / FILES[k]}\n" for k in ("flux", "ae", "clip_l", "t5xxl"))
        + f"  clip_tokenizer: {demo_dir / CLIP_DIR}\n  t5_tokenizer: {demo_dir / T5_DIR}\n"
    )
    lora = random_lora(demo_dir, tmp_path / "l.safetensors")
    out = tmp_path / "out.png"
    base = [
        "sample",
        "--config",
        str(config),
        "--prompt",
        "a cat",
        "--width",
        "80",
        "--height",
        "64",
        "--steps",
        "2",
        "--seed",
        "3",
        "--device",
        "cpu",
    ]
    assert main([*base, "--out", str(out)]) == 0
    assert main([*base, "--lora", f"{lora}:0", "--out", str(tmp_path / "zero.png")]) == 0
    assert main([*base, "--lora", f"{lora}:0.8", "--out", str(tmp_path / "lora.png")]) == 0
    with Image.open(out) as a, Image.open(tmp_path / "zero.png") as b, Image.open(tmp_path / "lora.png") as c:
        assert a.size == (80, 64) and a.format == "PNG"
        assert a.tobytes() == b.tobytes()  # multiplier 0 is the base model
        assert a.tobytes() != c.tobytes()
    assert main([*base, "--lora", str(tmp_path / "missing.safetensors"), "--out", str(out)]) == 2


def test_lora_argument_and_checkpoint_labels(tmp_path: Path) -> None:
    from fluxpipe.errors import FluxpipeError
    from fluxpipe.stages.evaluate import find_checkpoints, slug
    from fluxpipe.stages.sample import parse_lora_arg

    assert parse_lora_arg("a/b.safetensors:0.5") == (Path("a/b.safetensors"), 0.5)
    assert parse_lora_arg("a/b.safetensors") == (Path("a/b.safetensors"), 1.0)
    assert slug("epoch 5") == "epoch-000005" and slug("step 100") == "step-00000100" and slug("final") == "final"
    with pytest.raises(FluxpipeError, match="final LoRA is missing"):
        find_checkpoints(tmp_path, "run")
    for name, step, epoch in (
        ("run-000002", 10, 2),
        ("run", 30, 6),
        ("run-step00000005", 5, 1),
        ("run-000004", 20, 4),
        ("other", 1, 1),
    ):
        save_file(
            {"x": torch.zeros(1)},
            str(tmp_path / f"{name}.safetensors"),
            metadata={"ss_steps": str(step), "ss_epoch": str(epoch)},
        )
    found = find_checkpoints(tmp_path, "run")
    assert [(c.label, c.step) for c in found] == [
        ("base", 0),
        ("step 5", 5),
        ("epoch 2", 10),
        ("epoch 4", 20),
        ("final", 30),
    ]


def test_control_image_steers_the_sample(demo_dir: Path, tmp_path: Path) -> None:
    from fluxpipe.errors import FluxpipeError
    from fluxpipe.io.checkpoints import inspect_checkpoint
    from fluxpipe.models.controlnet import ControlNetFlux

    params = inspect_checkpoint(demo_dir / FILES["flux"], "flux").build().params
    torch.manual_seed(0)
    net = ControlNetFlux(params)
    for name, tensor in net.state_dict().items():  # wake the zero-initialised layers
        if name.startswith(("controlnet_blocks", "input_hint_block.14")):
            tensor.normal_(std=0.05)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "cn.safetensors"))
    for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        Image.new("RGB", (70, 50), colour).save(tmp_path / f"{name}.png")
    conds = encode_texts(
        files(demo_dir), ["a cube"], device="cpu", dtype=torch.float32, max_length=32, apply_t5_attn_mask=False
    )
    sampler = load_sampler(files(demo_dir), device="cpu", dtype=torch.float32, controlnet=tmp_path / "cn.safetensors")
    plain = SamplePrompt(index=0, prompt="a cube", width=64, height=48, steps=2)
    red = SamplePrompt(index=0, prompt="a cube", width=64, height=48, steps=2, control_image=tmp_path / "red.png")
    blue = SamplePrompt(index=0, prompt="a cube", width=64, height=48, steps=2, control_image=tmp_path / "blue.png")
    a, b, c = (sampler.latents(p, conds["a cube"], None, seed=1) for p in (plain, red, blue))
    assert not torch.allclose(a, b, atol=1e-5) and not torch.allclose(b, c, atol=1e-5)
    without = load_sampler(files(demo_dir), device="cpu", dtype=torch.float32)
    with pytest.raises(FluxpipeError, match="no ControlNet"):
        without.latents(red, conds["a cube"], None, seed=1)
