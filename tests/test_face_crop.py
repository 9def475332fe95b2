"""Face-crop geometry (face_crop_aug_range) on hand-computed values, the caption lookup of face-coordinate names, and
loss masks cut with each step's crop (random_crop / face crop with alpha_mask)."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fluxpipe.data.augment import ImageAugment, random_crop_origin
from fluxpipe.data.batches import make_batch
from fluxpipe.data.epochs import TrainItem
from fluxpipe.data.face_crop import CropPlan, FaceBox, check_face_image, face_box, face_crop_plan
from fluxpipe.data.masks import latent_mask
from fluxpipe.data.sources import caption_file
from fluxpipe.errors import FluxpipeError
from fluxpipe.training.live_latents import LatentEncoder, LiveLatents, image_rng

torch.set_num_threads(1)


class Scripted(random.Random):
    """uniform() and randint() return scripted values (checked against their bounds)."""

    def __init__(self, uniforms: list[float], ints: list[int]) -> None:
        super().__init__(0)
        self.uniforms, self.ints = list(uniforms), list(ints)
        self.calls: list[tuple[str, float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append(("uniform", a, b))
        value = self.uniforms.pop(0)
        assert a <= value <= b
        return value

    def randint(self, a: int, b: int) -> int:
        self.calls.append(("randint", a, b))
        value = self.ints.pop(0)
        assert a <= value <= b
        return value


FACE = FaceBox(cx=600, cy=300, w=100, h=120)


def test_face_box_from_the_file_name() -> None:
    assert face_box("/d/cat_600_300_100_120.png") == FACE
    assert face_box("/d/my_cat_600_300_100_120.jpg") == FACE  # the last four tokens
    assert face_box("/d/cat.png") is None and face_box("/d/a_1_2_3.png") is None  # fewer than five tokens
    assert face_box("/d/cat_0_300_100_120.png") is None  # centre x 0: no face (as the reference)
    with pytest.raises(FluxpipeError, match=r"a_b_c_d_e\.png: .*'b_c_d_e' is not four integers"):
        face_box("/d/a_b_c_d_e.png")


def test_face_crop_scale_and_jitter_hand_computed() -> None:
    # 1000x800 image to 256x256, face 120 px (max of w, h), range [2, 4]:
    # cover = max(256/800, 256/1000) = 0.32; low = max(0.32, 256/(120*4)) = 0.5333; high = min(1, 256/(120*2)) = 1
    rng = Scripted([0.75], [5, -6])
    plan = face_crop_plan((1000, 800), (256, 256), FACE, (2.0, 4.0), False, rng)
    # scale 0.75: 750x600, face centre (450, 225); rows 225 - 128 + 5 = 102, columns 450 - 128 - 6 = 316
    assert plan == CropPlan(resized=(750, 600), origin=(316, 102))
    assert rng.calls[0] == ("uniform", 256 / 480, 1.0)
    assert rng.calls[1:] == [("randint", -6, 6), ("randint", -6, 6)]  # 120 // 20, rows then columns


def test_face_crop_random_crop_jitter_hand_computed() -> None:
    rng = Scripted([0.75], [300, 10, 450, 450])
    plan = face_crop_plan((1000, 800), (256, 256), FACE, (2.0, 4.0), True, rng)
    # rows: reach max(600 - 225, 225) = 375: 97 + 300 + 10 - 375 = 32; columns: reach 450: 322 + 450 -> clamp 494
    assert plan == CropPlan(resized=(750, 600), origin=(494, 32))
    assert rng.calls[1:] == [("randint", 0, 375)] * 2 + [("randint", 0, 450)] * 2


def test_face_crop_single_value_range_draws_nothing() -> None:
    rng = Scripted([], [])
    plan = face_crop_plan((1000, 800), (256, 256), FACE, (3.0, 3.0), False, rng)
    # scale 256/360 = 0.7111: 711x569, centre (427, 213) -> origin (427 - 128, 213 - 128)
    assert plan == CropPlan(resized=(711, 569), origin=(299, 85)) and rng.calls == []
    # a small face (under 40 px): scale 1 (256/(30*4) > 1), centred, no jitter; an image of the target size is kept
    small = FaceBox(cx=500, cy=400, w=30, h=20)
    assert face_crop_plan((1000, 800), (256, 256), small, (2.0, 4.0), False, Scripted([], [])).origin == (372, 272)
    assert face_crop_plan((256, 256), (256, 256), FACE, (2.0, 4.0), True, rng) == CropPlan(
        resized=(256, 256), origin=(0, 0)
    )


def test_face_crop_with_a_known_seed() -> None:
    plan = face_crop_plan((1000, 800), (256, 256), FACE, (2.0, 4.0), False, random.Random(11))
    check = random.Random(11)
    scale = check.uniform(256 / 480, 1.0)
    resized = (int(1000 * scale + 0.5), int(800 * scale + 0.5))
    top = int(300 * scale + 0.5) - 128 + check.randint(-6, 6)
    left = int(600 * scale + 0.5) - 128 + check.randint(-6, 6)
    assert plan == CropPlan(resized=resized, origin=(left, top))


def test_face_crop_never_upscales() -> None:
    with pytest.raises(FluxpipeError, match=r"x\.png: 200x300 is smaller than the training size 256x256"):
        check_face_image("x.png", (200, 300), (256, 256))
    with pytest.raises(ValueError, match="upscaling"):
        face_crop_plan((200, 300), (256, 256), FACE, (2.0, 4.0), False, random.Random(0))


def test_caption_of_a_face_name_falls_back_to_the_name_without_coordinates(tmp_path: Path) -> None:
    image = tmp_path / "cat_1_2_3_4.png"
    assert caption_file(image, ".txt") == tmp_path / "cat_1_2_3_4.txt"  # neither exists
    (tmp_path / "cat.txt").write_text("a cat")
    assert caption_file(image, ".txt") == tmp_path / "cat.txt"
    (tmp_path / "cat_1_2_3_4.txt").write_text("own")
    assert caption_file(image, ".txt") == tmp_path / "cat_1_2_3_4.txt"  # its own caption first


# ---- loss masks follow the step's crop -----------------------------------------------------------------------


def _encoder(aug: ImageAugment) -> LatentEncoder:
    """A LatentEncoder whose AE returns zeros of the latent shape (the crop, not the AE, is under test)."""
    enc = object.__new__(LatentEncoder)
    enc.live = LiveLatents(ae=Path("unused"), augments=((aug,),), seed=3)
    enc.device, enc.dtype = "cpu", torch.float32
    enc.ae = SimpleNamespace(encoder=lambda x: torch.zeros(1, 32, x.shape[2] // 8, x.shape[3] // 8))
    return enc


def _rgba(path: Path, width: int, height: int) -> np.ndarray:
    rgba = np.random.default_rng(1).integers(0, 256, (height, width, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(path)
    return rgba[..., 3].astype(np.float32) / 255.0


def _item(path: Path, size: tuple[int, int], bucket: tuple[int, int]) -> TrainItem:
    # caption_id is fixed: the seeded draws must not depend on tmp_path (a CI run drew the centred crop)
    return TrainItem(
        row=0, dataset=0, latent_keys=("l",), text_key="t", bucket=bucket, is_reg=False, repeats=1,
        mask_keys=("m",), image=str(path), resized=size, crop=(0, 0), size=size, mask_source="alpha",
        caption_id="0:/d/a.png",
    )  # fmt: skip


def test_random_crop_mask_is_the_crop_of_the_full_mask_at_the_image_origin(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    alpha = _rgba(path, 96, 64)  # resized = size: the crop alone moves the mask
    item = _item(path, (96, 64), (64, 64))
    out = _encoder(ImageAugment(random_crop=True)).moments(item, False, 2, 7)
    assert out is not None and out[2] is not None
    left, top = random_crop_origin((96, 64), (64, 64), image_rng(3, 2, 7, item.caption_id))
    assert (left, top) == (25, 0)  # not the centred crop (16, 0): the seeded draw of the fixed id
    want = latent_mask(torch.from_numpy(alpha[top : top + 64, left : left + 64].copy()), 8, 8)[0]
    assert torch.allclose(out[2], want, atol=1e-6)
    flipped = _encoder(ImageAugment(random_crop=True)).moments(item, True, 2, 7)
    assert flipped is not None and flipped[2] is not None and torch.allclose(flipped[2], want.flip(-1), atol=1e-6)


def test_face_crop_mask_follows_the_face_crop(tmp_path: Path) -> None:
    path = tmp_path / "a_48_40_16_16.png"
    alpha = _rgba(path, 96, 80)
    item = _item(path, (96, 80), (64, 64))
    out = _encoder(ImageAugment(face_crop=(1.0, 1.0))).moments(item, False, 0, 0)
    # scale min(1, max(64/80, 64/16)) = 1: no resize; origin (48 - 32, 40 - 32), no draw (single-value range)
    want = latent_mask(torch.from_numpy(alpha[8:72, 16:80].copy()), 8, 8)[0]
    assert out is not None and out[2] is not None and torch.allclose(out[2], want, atol=1e-6)


class _Tensors:
    def latent(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(16, 2, 2), torch.full((16, 2, 2), -30.0)

    def text(self, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.zeros(768), torch.zeros(4, 4096), torch.ones(4, dtype=torch.uint8)

    def mask(self, key: str) -> torch.Tensor:
        return torch.ones(2, 2)


def test_make_batch_takes_the_fresh_mask_over_the_cached_one(tmp_path: Path) -> None:
    items = [_item(tmp_path / "a.png", (16, 16), (16, 16)), _item(tmp_path / "b.png", (16, 16), (16, 16))]
    fresh_mask = torch.tensor([[0.0, 0.5], [1.0, 0.25]])

    def fresh(it: TrainItem, flipped: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        return (
            (torch.zeros(16, 2, 2), torch.full((16, 2, 2), -30.0), fresh_mask) if it.image.endswith("a.png") else None
        )

    batch = make_batch(items, [0, 1], _Tensors(), torch.Generator().manual_seed(0), "cpu", torch.float32, fresh=fresh)  # type: ignore[arg-type]
    assert torch.equal(batch["loss_mask"], torch.stack([fresh_mask, torch.ones(2, 2)]))


def test_the_pipeline_inputs_hold_the_caption_without_coordinates(tmp_path: Path) -> None:
    from fluxpipe.config.pipeline import load_pipeline
    from fluxpipe.workflow import dataset_files

    images = tmp_path / "img"
    images.mkdir()
    Image.new("RGB", (64, 64)).save(images / "cat_1_2_3_4.png")
    for name in ("cat.txt", "dog.txt"):
        (images / name).write_text("x")
    toml = tmp_path / "d.toml"
    toml.write_text(
        f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{images}"\ncaption_extension = ".txt"\n'
    )
    files = dataset_files(load_pipeline({"dataset_config": str(toml)}))
    assert files == [str(images / "cat.txt"), str(images / "cat_1_2_3_4.png")]  # (dog.txt captions no image)
