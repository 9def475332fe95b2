"""ControlNet conditioning images: pairing in the manifest, the loader's resize/centre crop/flip, the demo set."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, dataset_toml, make_dataset
from PIL import Image, ImageFilter, ImageOps

from fluxpipe.config.dataset import load_dataset_toml
from fluxpipe.data import conditioning
from fluxpipe.data.conditioning import ConditioningImages, load_conditioning
from fluxpipe.data.images import is_image_file, load_rgb, resize_and_crop, to_tensor
from fluxpipe.errors import FluxpipeError
from fluxpipe.io.hashing import sha256_file
from fluxpipe.io.tables import read_parquet
from fluxpipe.stages import manifest

RED, BLUE = (255, 0, 0), (0, 0, 255)


def cn_toml(root: Path, images: Path, cond: Path, *, bucket: bool = True, flip: bool = False) -> Path:
    """A one-subset ControlNet dataset TOML (resolution 64, buckets 32..128 step 16 when ``bucket``)."""
    path = root / "cn.toml"
    path.write_text(f"""[general]
caption_extension = ".txt"
[[datasets]]
resolution = 64
enable_bucket = {str(bucket).lower()}
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 16
[[datasets.subsets]]
image_dir = "{images}"
conditioning_data_dir = "{cond}"
flip_aug = {str(flip).lower()}
""")
    return path


def cn_dataset(root: Path, n: int = 4) -> dict[str, Path]:
    """``n`` images in root/data and, in root/cond, a conditioning image per stem (another extension)."""
    cond = root / "cond"
    cond.mkdir(parents=True)
    pairs = {}
    for image in make_dataset(root / "data", n):
        pairs[image.stem] = cond / f"{image.stem}{'.png' if image.suffix == '.jpg' else '.bmp'}"
        ImageOps.invert(load_rgb(image)).save(pairs[image.stem])
    return pairs


def run_manifest(root: Path, toml: Path, skip: bool = False) -> pd.DataFrame:
    cfg = manifest.ManifestConfig(
        datasets=load_dataset_toml(toml),
        out=root / "m.parquet",
        latent_shards=2,
        text_shards=2,
        hash_cache=root / "h.json",
        skip_bad_images=skip,
    )
    return manifest.run(cfg)


def test_manifest_rows_carry_their_conditioning_image(tmp_path: Path) -> None:
    pairs = cn_dataset(tmp_path)
    table = run_manifest(tmp_path, cn_toml(tmp_path, tmp_path / "data", tmp_path / "cond"))
    assert len(table) == 4
    for row in table.itertuples():
        expected = pairs[Path(row.path).stem]
        assert row.conditioning == str(expected)
        assert row.conditioning_sha256 == sha256_file(expected)
    assert {Path(p).suffix for p in table.conditioning} == {".png", ".bmp"}


def test_non_controlnet_dataset_has_empty_conditioning(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data", 3)
    table = run_manifest(tmp_path, dataset_toml(tmp_path / "d.toml", tmp_path / "data"))
    assert len(table) == 3
    assert list(table.conditioning) == [""] * 3 and list(table.conditioning_sha256) == [""] * 3


def _missing(cond: Path) -> None:
    (cond / "img0001.bmp").unlink()


def _extra(cond: Path) -> None:
    Image.new("RGB", (64, 64)).save(cond / "stray.png")


def _two(cond: Path) -> None:
    Image.new("RGB", (64, 64)).save(cond / "img0000.webp")  # beside img0000.png


def _size(cond: Path) -> None:
    Image.new("RGB", (50, 40)).save(cond / "img0002.png")


PROBLEMS = {
    "missing": (_missing, r"img0001\.png: no conditioning image img0001\.\* in"),
    "extra": (_extra, r"stray\.png: conditioning image without a target"),
    "two": (_two, r"img0000\.jpg: 2 conditioning images with its stem in \S+: img0000\.png, img0000\.webp"),
    "size": (_size, r"img0002\.jpg: \d+x\d+ but its conditioning image \S+img0002\.png is 50x40"),
}


@pytest.mark.parametrize("case", sorted(PROBLEMS))
def test_each_pairing_problem_is_one_error_naming_the_file(tmp_path: Path, case: str) -> None:
    cn_dataset(tmp_path)
    spoil, says = PROBLEMS[case]
    spoil(tmp_path / "cond")
    with pytest.raises(FluxpipeError, match="^1 bad dataset files: ") as err:
        run_manifest(tmp_path, cn_toml(tmp_path, tmp_path / "data", tmp_path / "cond"))
    assert re.search(says, str(err.value)), str(err.value)
    assert not (tmp_path / "m.parquet").exists()


def test_all_pairing_problems_are_listed_in_one_error(tmp_path: Path) -> None:
    cn_dataset(tmp_path)
    for spoil, _ in PROBLEMS.values():
        spoil(tmp_path / "cond")
    with pytest.raises(FluxpipeError, match="^4 bad dataset files: ") as err:
        run_manifest(tmp_path, cn_toml(tmp_path, tmp_path / "data", tmp_path / "cond"))
    for _, says in PROBLEMS.values():
        assert re.search(says, str(err.value)), str(err.value)


def test_skip_bad_images_leaves_unpaired_targets_out(tmp_path: Path) -> None:
    cn_dataset(tmp_path)
    for spoil, _ in PROBLEMS.values():
        spoil(tmp_path / "cond")
    table = run_manifest(tmp_path, cn_toml(tmp_path, tmp_path / "data", tmp_path / "cond"), skip=True)
    assert [Path(p).name for p in table.path] == ["img0003.png"]
    _, meta = read_parquet(tmp_path / "m.parquet")
    assert len(json.loads(meta["fluxpipe.left_out"])) == 4


def test_a_changed_conditioning_image_changes_the_row(tmp_path: Path) -> None:
    pairs = cn_dataset(tmp_path, 2)
    toml = cn_toml(tmp_path, tmp_path / "data", tmp_path / "cond")
    before = run_manifest(tmp_path, toml)
    ImageOps.mirror(load_rgb(pairs["img0000"])).save(pairs["img0000"])
    after = run_manifest(tmp_path, toml)
    changed = before.conditioning_sha256 != after.conditioning_sha256
    assert list(changed) == [True, False] and list(before.sha256) == list(after.sha256)


def halves(size: tuple[int, int], split: int, vertical: bool) -> Image.Image:
    """Red before ``split`` (columns, or rows when ``vertical``), blue after."""
    img = Image.new("RGB", size, BLUE)
    img.paste(RED, (0, 0, size[0], split) if vertical else (0, 0, split, size[1]))
    return img


@pytest.mark.parametrize("vertical", [False, True], ids=["wide", "tall"])
def test_load_conditioning_resizes_and_centre_crops(tmp_path: Path, vertical: bool) -> None:
    size, resized = ((128, 192), (64, 96)) if vertical else ((192, 128), (96, 64))
    halves(size, 80, vertical).save(tmp_path / "c.png")
    x = load_conditioning(tmp_path / "c.png", resized, (64, 64))
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    # halved: red up to 40 of 96; the centre crop starts at 16, so red covers 24 of its 64 lines
    red, blue = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1), torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1)
    lines = x.transpose(1, 2) if vertical else x  # index lines as [c, :, line]
    assert torch.equal(lines[:, :, :24], red.expand(3, 64, 24))
    assert torch.equal(lines[:, :, 24:], blue.expand(3, 64, 40))


def test_flip_mirrors_the_conditioning_image(tmp_path: Path) -> None:
    halves((192, 128), 80, vertical=False).save(tmp_path / "c.png")
    x = load_conditioning(tmp_path / "c.png", (96, 64), (64, 64))
    flipped = load_conditioning(tmp_path / "c.png", (96, 64), (64, 64), flip=True)
    assert torch.equal(flipped, x.flip(-1))
    assert flipped[0, 0, 63] == 1.0 and flipped[0, 0, 0] == -1.0  # red now on the right


def _noise(path: Path, size: tuple[int, int], seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_a_copy_of_the_target_gives_the_target_pixels(tmp_path: Path) -> None:
    """Same resampling and crop as the latent stage: shrunk, enlarged and bucket-sized targets."""
    data, cond = tmp_path / "data", tmp_path / "cond"
    data.mkdir()
    cond.mkdir()
    for i, size in enumerate([(120, 72), (20, 20), (64, 96), (100, 100)]):
        _noise(data / f"n{i}.png", size, i)
        (data / f"n{i}.txt").write_text("noise")
        shutil.copy(data / f"n{i}.png", cond / f"n{i}.png")
    table = run_manifest(tmp_path, cn_toml(tmp_path, data, cond))
    assert table.upscaled.any() and not table.upscaled.all()
    images = ConditioningImages()
    for _, row in table.iterrows():
        target = resize_and_crop(
            load_rgb(Path(row.path)),
            (row.resized_w, row.resized_h),
            row.crop_left,
            row.crop_top,
            (row.bucket_w, row.bucket_h),
        )
        assert torch.equal(images.get(row), to_tensor(target)), row.path


def test_without_buckets_another_size_is_scaled_onto_the_target(tmp_path: Path) -> None:
    data, cond = tmp_path / "data", tmp_path / "cond"
    data.mkdir()
    cond.mkdir()
    halves((96, 64), 48, vertical=False).save(data / "a.png")
    (data / "a.txt").write_text("halves")
    halves((48, 32), 24, vertical=False).save(cond / "a.png")  # half size, same picture
    (row,) = [r for _, r in run_manifest(tmp_path, cn_toml(tmp_path, data, cond, bucket=False)).iterrows()]
    x = ConditioningImages().get(row)
    target = to_tensor(
        resize_and_crop(
            load_rgb(data / "a.png"),
            (row.resized_w, row.resized_h),
            row.crop_left,
            row.crop_top,
            (row.bucket_w, row.bucket_h),
        )
    )
    assert x.shape == target.shape == (3, row.bucket_h, row.bucket_w)
    assert (x - target).abs().mean() < 0.05


def test_conditioning_images_load_once_per_path_and_flip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    halves((192, 128), 80, vertical=False).save(tmp_path / "c.png")
    calls = []
    real = conditioning.load_conditioning

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(kwargs.get("flip"))
        return real(*args, **kwargs)

    monkeypatch.setattr(conditioning, "load_conditioning", counting)
    row = {
        "path": "t.png",
        "conditioning": str(tmp_path / "c.png"),
        "width": 192,
        "height": 128,
        "resized_w": 96,
        "resized_h": 64,
        "bucket_w": 64,
        "bucket_h": 64,
    }
    images = ConditioningImages()
    first = images.get(row)
    assert torch.equal(images.get(row), first) and torch.equal(first, real(tmp_path / "c.png", (96, 64), (64, 64)))
    assert torch.equal(images.get(row, flip=True), first.flip(-1))
    images.get(row, flip=True)
    assert calls == [False, True] and len(images) == 2
    with pytest.raises(FluxpipeError, match="t.png: the manifest row has no conditioning image"):
        images.get({**row, "conditioning": ""})


DEMO = REPO / "config" / "demo"


def test_demo_conditioning_images_pair_with_the_photos(tmp_path: Path) -> None:
    photos = sorted(p for p in (DEMO / "images").iterdir() if is_image_file(p))
    conds = sorted(p for p in (DEMO / "conditioning").iterdir() if is_image_file(p))
    assert len(photos) == 6 and [p.stem for p in photos] == [c.stem for c in conds]
    for photo, cond in zip(photos, conds, strict=True):
        assert cond.suffix == ".png" and Image.open(cond).size == load_rgb(photo).size, cond
        edges = ImageOps.autocontrast(load_rgb(photo).convert("L").filter(ImageFilter.FIND_EDGES)).convert("RGB")
        diff = np.abs(np.asarray(edges, dtype=np.int16) - np.asarray(load_rgb(cond), dtype=np.int16))
        assert diff.mean() < 2.0, cond  # an edge map of this photo (decoders may differ by a level)
    table = run_manifest(tmp_path, cn_toml(tmp_path, DEMO / "images", DEMO / "conditioning"))
    assert sorted(Path(p).stem for p in table.conditioning) == [p.stem for p in photos]


def test_a_conditioning_folder_shared_by_two_subsets_pairs_with_both(tmp_path: Path) -> None:
    pairs = cn_dataset(tmp_path, 2)
    other = tmp_path / "other"
    other.mkdir()
    for name in ("x", "y"):
        Image.new("RGB", (64, 64), RED).save(other / f"{name}.png")
        (other / f"{name}.txt").write_text("red")
        Image.new("RGB", (64, 64), BLUE).save(tmp_path / "cond" / f"{name}.png")
    toml = cn_toml(tmp_path, tmp_path / "data", tmp_path / "cond")
    toml.write_text(
        toml.read_text() + f'[[datasets.subsets]]\nimage_dir = "{other}"\n'
        f'conditioning_data_dir = "{tmp_path / "cond"}"\n'
    )
    table = run_manifest(tmp_path, toml)
    assert sorted(Path(c).name for c in table.conditioning) == sorted(
        [p.name for p in pairs.values()] + ["x.png", "y.png"]
    )
