"""Per-step image augmentation (random_crop, color_aug, face_crop_aug_range) with latent caching off: the reference's draws on
hand-computed pixels, and `fluxpipe train lora` encoding those subsets each step (refused with --cache_latents)."""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_lora_argv
from PIL import Image

from fluxpipe.cli import main
from fluxpipe.commands.train_caches import check_fresh_latents
from fluxpipe.config.dataset import parse_datasets
from fluxpipe.data import augment
from fluxpipe.data.augment import ImageAugment, color_aug, fresh_image, random_crop_origin
from fluxpipe.data.images import resize_and_crop, to_tensor
from fluxpipe.errors import FluxpipeError
from fluxpipe.training import live_latents


class Scripted(random.Random):
    """A generator whose random() / uniform() return scripted values (the reference's draw order)."""

    def __init__(self, randoms: list[float], uniforms: list[float]) -> None:
        super().__init__(0)
        self.randoms, self.uniforms = list(randoms), list(uniforms)

    def random(self) -> float:
        return self.randoms.pop(0)

    def uniform(self, a: float, b: float) -> float:
        value = self.uniforms.pop(0)
        assert a <= value <= b
        return value


def test_random_crop_origin_draws_width_then_height() -> None:
    rng = random.Random(3)
    check = random.Random(3)
    expected = (check.randint(0, 40), check.randint(0, 8))
    assert random_crop_origin((104, 72), (64, 64), rng) == expected
    assert random_crop_origin((64, 64), (64, 64), random.Random(3)) == (0, 0)  # nothing to trim: no draw


def test_color_aug_hue_shift_of_pure_colours() -> None:
    # the RGB array [255, 0, 0] read as BGR is pure blue: OpenCV hue 120 (240 degrees)
    red = np.array([[[255, 0, 0]]], dtype=np.uint8)
    # +6: hue 126 = 252 degrees -> sector 4, f = 0.2: (r, g, b) = (255 * 0.2, 0, 255) -> BGR [255, 0, 51]
    assert color_aug(red, Scripted([0.1, 0.9], [6.0])).tolist() == [[[255, 0, 51]]]
    # -6: 180 - 6 = 174 added mod 180 -> 114 = 228 degrees -> sector 3, f = 0.8: (0, 51, 255) -> BGR [255, 51, 0]
    assert color_aug(red, Scripted([0.1, 0.9], [-6.0])).tolist() == [[[255, 51, 0]]]


def test_color_aug_gamma_is_on_the_0_255_values() -> None:
    x = np.array([[[100, 200, 250]]], dtype=np.uint8)
    got = color_aug(x, Scripted([0.2, 0.4], [1.04]))
    # 100 ** 1.04 = 120.22..., 200 ** 1.04 = 247.1..., 250 ** 1.04 = 312.1... -> clipped
    assert got.tolist() == [[[120, 247, 255]]]
    assert color_aug(x, Scripted([0.5], [])).tolist() == x.tolist()  # p = 0.33: most draws change nothing


def test_fresh_pixels_crop_at_the_drawn_origin(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (72, 104, 3), dtype=np.uint8)).save(path)
    aug = ImageAugment(random_crop=True)
    got = fresh_image(path, (104, 72), (20, 4), (64, 64), None, True, aug, random.Random(5))[0]
    left, top = random_crop_origin((104, 72), (64, 64), random.Random(5))
    want = to_tensor(resize_and_crop(Image.open(path).convert("RGB"), (104, 72), left, top, (64, 64))).flip(-1)
    assert torch.equal(got, want)
    centred = fresh_image(path, (104, 72), (20, 4), (64, 64), None, False, ImageAugment(), random.Random(5))[0]
    assert torch.equal(centred, to_tensor(resize_and_crop(Image.open(path).convert("RGB"), (104, 72), 20, 4, (64, 64))))


# ---- `fluxpipe train lora` ------------------------------------------------------------------------------------


def _dataset(tmp: Path, subset: str) -> Path:
    images = tmp / "images"
    images.mkdir()
    for name in ("cat", "coffee", "astronaut"):
        src = next(p for p in (REPO / "config/demo/images").iterdir() if p.stem == name and p.suffix != ".txt")
        shutil.copy(src, images / src.name)
        (images / f"{name}.txt").write_text(f"a photo of a {name}\n")
    toml = tmp / "dataset.toml"
    toml.write_text(
        '[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 128\nbatch_size = 3\n'
        f'  [[datasets.subsets]]\n  image_dir = "{images}"\n  {subset}\n'
    )
    return toml


def _command(demo: Path, toml: Path, out: Path, *extra: str) -> list[str]:
    return tiny_lora_argv(demo, toml, out, 2, "--network_train_unet_only", "--cache_text_encoder_outputs", *extra)


def test_train_lora_encodes_augmented_images_each_step(
    demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = _dataset(tmp_path, "random_crop = true\n  color_aug = true\n  flip_aug = true")
    seen: list[tuple[str, int, int]] = []
    moments = live_latents.LatentEncoder.moments

    def spy(self: live_latents.LatentEncoder, item, flipped: bool, epoch: int, step: int):  # noqa: ANN001, ANN202
        out = moments(self, item, flipped, epoch, step)
        assert out is not None and out[0].shape == (16, 16, 16)  # 128 px bucket: a 16x16 latent grid
        seen.append((Path(item.image).stem, epoch, step))
        return out

    monkeypatch.setattr(live_latents.LatentEncoder, "moments", spy)
    assert main(_command(demo_dir, toml, tmp_path / "out")) == 0
    assert (tmp_path / "out/lora.safetensors").is_file()
    # 3 images per step (batch_size 3, one bucket), 2 steps
    assert sorted(s for s, _, _ in seen) == sorted(["cat", "coffee", "astronaut"] * 2)
    assert {(e, st) for _, e, st in seen} == {(0, 0), (1, 1)}


def test_augmentation_with_cached_latents_is_one_line_exit_2(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = _dataset(tmp_path, "random_crop = true")
    assert main(_command(demo_dir, toml, tmp_path / "out", "--cache_latents")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "random_crop = True" in err[0] and "turn cache_latents off" in err[0]


def _face_dataset(tmp: Path, subset: str) -> Path:
    """The demo's cat, coffee and astronaut named NAME_CX_CY_W_H (a face box), captions NAME.txt."""
    images = tmp / "images"
    images.mkdir()
    for name, face in (("cat", "160_100_60_60"), ("coffee", "150_110_70_50"), ("astronaut", "160_140_90_80")):
        src = next(p for p in (REPO / "config/demo/images").iterdir() if p.stem == name and p.suffix != ".txt")
        shutil.copy(src, images / f"{name}_{face}{src.suffix}")
        (images / f"{name}.txt").write_text(f"a photo of a {name}\n")
    toml = tmp / "dataset.toml"
    toml.write_text(
        '[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 128\nbatch_size = 3\n'
        f'  [[datasets.subsets]]\n  image_dir = "{images}"\n  {subset}\n'
    )
    return toml


def test_train_lora_crops_around_the_faces_each_step(
    demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = _face_dataset(tmp_path, "face_crop_aug_range = [2.0, 4.0]\n  alpha_mask = true")
    plans: list[tuple[tuple[int, int], tuple[int, int]]] = []
    masks: list[torch.Tensor | None] = []
    plan, moments = augment.face_crop_plan, live_latents.LatentEncoder.moments

    def spy_plan(size, target, face, aug_range, random_crop, rng):  # noqa: ANN001, ANN202
        out = plan(size, target, face, aug_range, random_crop, rng)
        plans.append((size, out.resized))
        return out

    def spy_moments(self: live_latents.LatentEncoder, item, flipped: bool, epoch: int, step: int):  # noqa: ANN001, ANN202
        out = moments(self, item, flipped, epoch, step)
        masks.append(None if out is None else out[2])
        return out

    monkeypatch.setattr(augment, "face_crop_plan", spy_plan)
    monkeypatch.setattr(live_latents.LatentEncoder, "moments", spy_moments)
    assert main(_command(demo_dir, toml, tmp_path / "out")) == 0
    assert (tmp_path / "out/lora.safetensors").is_file()
    assert len(plans) == 6 and all(size in ((320, 213), (320, 320)) for size, _ in plans)  # 3 images x 2 steps
    # cat: face 60 px, 128 px target: scale in [max(128/213, 128/240), 1] = [0.601, 1]
    assert all(128 <= min(resized) <= max(size) for size, resized in plans)
    assert len(masks) == 6 and all(m is not None and m.shape == (16, 16) for m in masks)  # alpha mask cut each step


def test_face_crop_with_cached_latents_is_one_line_exit_2(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = _face_dataset(tmp_path, "face_crop_aug_range = [2.0, 4.0]")
    assert main(_command(demo_dir, toml, tmp_path / "out", "--cache_latents")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "face_crop_aug_range = (2.0, 4.0)" in err[0] and "turn cache_latents off" in err[0]


def test_random_crop_or_face_crop_with_kontext_is_refused() -> None:
    data = {"datasets": [{"resolution": 512, "subsets": [{"image_dir": "i", "face_crop_aug_range": [2.0, 4.0]}]}]}
    kontext, dev = argparse.Namespace(model_type="kontext"), argparse.Namespace(model_type="flux")
    check_fresh_latents(parse_datasets(data, "d.toml"), dev)  # (no references to misalign)
    with pytest.raises(FluxpipeError, match=r"d\.toml: datasets\[0\]\.subsets\[0\]: face_crop_aug_range with Kontext"):
        check_fresh_latents(parse_datasets(data, "d.toml"), kontext)
    data["datasets"][0]["enable_bucket"] = True  # ignored with buckets: nothing to refuse
    check_fresh_latents(parse_datasets(data, "d.toml"), kontext)
    data["datasets"][0]["subsets"][0]["random_crop"] = True
    with pytest.raises(FluxpipeError, match="random_crop with Kontext"):
        check_fresh_latents(parse_datasets(data, "d.toml"), kontext)
