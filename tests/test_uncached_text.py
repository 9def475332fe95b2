"""Uncached text (mode a): without --cache_text_encoder_outputs the captions are augmented and encoded each step;
the cached variants (mode b) are the same strings per (seed, epoch, item); token warm-up works only here."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from conftest import REPO, tiny_lora_argv

from fluxpipe.cli import main
from fluxpipe.data.captions import CaptionAugment, caption_slots
from fluxpipe.data.epochs import TrainItem
from fluxpipe.training import live_text
from fluxpipe.training.live_text import LiveText, step_captions


def _item(caption: str, cid: str = "0:a.png", subset: int = 0) -> TrainItem:
    return TrainItem(
        row=0,
        dataset=0,
        latent_keys=("k",),
        text_key="t",
        bucket=(64, 64),
        is_reg=False,
        repeats=1,
        subset=subset,
        source_caption=caption,
        caption_id=cid,
    )


def test_step_captions_shuffle_with_keep_tokens_on_a_known_seed() -> None:
    aug = CaptionAugment(shuffle_caption=True, keep_tokens=1)
    live = LiveText(t5xxl=Path("t5"), augments=((aug,),), seed=7)
    (got,) = step_captions(live, [_item("sks, red, blue, green, tall")], epoch=3, step=0, total=10)
    flex = ["red", "blue", "green", "tall"]
    random.Random("fluxpipe.caption:7:3:0:a.png").shuffle(flex)  # the generator of (seed 7, epoch 3, item)
    assert got == ", ".join(["sks", *flex])
    assert got.startswith("sks, ") and sorted(got.split(", ")[1:]) == ["blue", "green", "red", "tall"]


def test_mode_b_slots_equal_mode_a_captions_of_each_epoch() -> None:
    aug = CaptionAugment(shuffle_caption=True, caption_tag_dropout_rate=0.3, caption_dropout_rate=0.2)
    live = LiveText(t5xxl=Path("t5"), augments=((aug,),), seed=11)
    caption, cid = "a, b, c, d, e, f", "0:img/x.png"
    slots = caption_slots(caption, aug, 11, cid, 6)
    uncached = [step_captions(live, [_item(caption, cid)], epoch=e, step=0, total=100)[0] for e in range(6)]
    assert uncached == slots and len(set(slots)) > 1


def test_token_warmup_grows_the_caption_with_the_step() -> None:
    aug = CaptionAugment(token_warmup_min=1, token_warmup_step=0.5)  # half of 8 steps: 4 warm-up steps
    live = LiveText(t5xxl=Path("t5"), augments=((aug,),))
    item = _item("a, b, c, d, e")
    got = [step_captions(live, [item], epoch=0, step=s, total=8)[0] for s in range(6)]
    # flexible tags kept: floor(step * (5 - 1) / 4) + 1
    assert got == ["a", "a, b", "a, b, c", "a, b, c, d", "a, b, c, d, e", "a, b, c, d, e"]


def test_each_subset_uses_its_own_keys() -> None:
    plain, shuffled = CaptionAugment(), CaptionAugment(caption_dropout_rate=1.0)
    live = LiveText(t5xxl=Path("t5"), augments=((plain, shuffled),))
    items = [_item("x, y", subset=0), _item("x, y", subset=1)]
    assert step_captions(live, items, epoch=0, step=0, total=1) == ["x, y", ""]


# ---- `fluxpipe train lora` without the text cache -------------------------------------------------------------


def _dataset(tmp: Path, general: str) -> Path:
    images = tmp / "images"
    images.mkdir()
    for name in ("astronaut", "brick", "cat"):
        src = next((REPO / "config/demo/images").glob(f"{name}.*[!t]"))
        shutil.copy(src, images / src.name)
        (images / f"{name}.txt").write_text(f"{name}, photo, detailed, sharp\n")
    toml = tmp / "dataset.toml"
    toml.write_text(
        f'[general]\ncaption_extension = ".txt"\n{general}\n[[datasets]]\nresolution = 128\nbatch_size = 2\n'
        f'  [[datasets.subsets]]\n  image_dir = "{images}"\n'
    )
    return toml


def _command(demo: Path, toml: Path, out: Path, *extra: str) -> list[str]:
    return tiny_lora_argv(demo, toml, out, 3, *extra)


def test_train_lora_encodes_each_steps_captions(
    demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = _dataset(tmp_path, "shuffle_caption = true\nkeep_tokens = 1\ntoken_warmup_step = 2")
    seen: list[list[str]] = []
    call = live_text.TextEncoders.__call__

    def spy(self: live_text.TextEncoders, captions: list[str], device: str, dtype: object) -> dict:
        seen.append(list(captions))
        return call(self, captions, device, dtype)  # type: ignore[arg-type]

    monkeypatch.setattr(live_text.TextEncoders, "__call__", spy)
    assert main(_command(demo_dir, toml, tmp_path / "out", "--network_train_unet_only")) == 0
    assert (tmp_path / "out/lora.safetensors").is_file()
    assert len(seen) == 3 and all(len(b) in (1, 2) for b in seen)
    # step 0: token warm-up keeps the kept tag and one flexible tag; from step 2 on every tag, shuffled
    assert all(len(c.split(", ")) == 2 for c in seen[0]) and all(len(c.split(", ")) == 4 for c in seen[2])
    assert all(c.split(", ")[0] in ("astronaut", "brick", "cat") for b in seen for c in b)


def test_token_warmup_with_cached_text_is_one_line_exit_2(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = _dataset(tmp_path, "token_warmup_step = 2")
    assert main(_command(demo_dir, toml, tmp_path / "out", "--cache_text_encoder_outputs")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "turn off cache_text_encoder_outputs" in err[0]


def test_train_t5xxl_with_cached_text_is_one_line_exit_2(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = _dataset(tmp_path, "")
    args = _command(
        demo_dir, toml, tmp_path / "out", "--cache_text_encoder_outputs", "--network_args", "train_t5xxl=True"
    )
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "turn off cache_text_encoder_outputs" in err[0]
