"""Masked loss and prior-loss weighting against hand-computed values (spec §4.5), and the cached loss masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from fluxpipe.cli import main
from fluxpipe.data.batches import TrainItem, epoch_captions, make_batch
from fluxpipe.data.masks import cached_mask, latent_mask, mask_pixels
from fluxpipe.training.loss import packed_mask, weighted_loss


def test_masked_loss_on_a_2x2_mask() -> None:
    per_element = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # [B=1, 2, 2]
    mask = torch.tensor([[[1.0, 0.0], [0.5, 1.0]]])
    # (1·1 + 2·0 + 3·0.5 + 4·1) / 4 = 1.625: masked, then the mean over all elements (no renormalisation)
    assert weighted_loss(per_element, mask).tolist() == [1.625]
    assert weighted_loss(per_element, mask, torch.tensor([0.5])).tolist() == [0.8125]


def test_prior_loss_weight_scales_the_reg_items() -> None:
    per_element = torch.tensor([[2.0, 2.0, 2.0, 2.0], [4.0, 4.0, 0.0, 0.0]])
    loss = weighted_loss(per_element, None, torch.tensor([1.0, 0.25]))  # item 1 is a reg image, weight 0.25
    assert loss.tolist() == [2.0, 0.5]
    assert float(loss.mean()) == 1.25  # the batch mean the trainer backpropagates


def test_packed_mask_follows_the_packing_order() -> None:
    mask = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # one 2x2 latent patch -> one token of 16 channels x 2 x 2
    packed = packed_mask(mask)
    assert packed.shape == (1, 1, 64)
    assert packed[0, 0].tolist() == [1.0, 2.0, 3.0, 4.0] * 16  # feature c·4 + ph·2 + pw


def test_the_packed_mask_weights_the_flow_loss() -> None:
    from fluxpipe.maths import flow

    pred, target = torch.ones(1, 1, 64), torch.zeros(1, 1, 64)  # squared error 1 everywhere
    mask = packed_mask(torch.tensor([[[1.0, 0.0], [0.5, 1.0]]]))
    assert flow.loss(pred, target, "l2", mask=mask).tolist() == [0.625]  # (1 + 0 + 0.5 + 1) / 4


def test_latent_mask_is_the_mean_of_each_cell() -> None:
    pixels = torch.zeros(16, 16)
    pixels[:, :8] = 1.0
    pixels[8:, 8:12] = 1.0  # half of the bottom-right cell
    assert latent_mask(pixels, 2, 2)[0].tolist() == [[1.0, 0.0], [1.0, 0.5]]


def _rgba(path: Path, size: tuple[int, int] = (16, 16)) -> Path:
    img = Image.new("RGBA", size, (10, 20, 30, 255))
    for x in range(size[0] // 2, size[0]):
        for y in range(size[1]):
            img.putpixel((x, y), (10, 20, 30, 0))
    img.save(path)
    return path


def test_alpha_mask_is_cached_on_the_latent_grid(tmp_path: Path) -> None:
    path = _rgba(tmp_path / "a.png")
    pixels = mask_pixels("alpha", path, (16, 16), (16, 16), (0, 0), (16, 16))
    assert cached_mask(pixels, flip=False).tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert cached_mask(pixels, flip=True).tolist() == [[0.0, 1.0], [0.0, 1.0]]
    Image.new("RGB", (16, 16)).save(tmp_path / "b.png")  # no alpha: nothing masked
    plain = mask_pixels("alpha", tmp_path / "b.png", (16, 16), (16, 16), (0, 0), (16, 16))
    assert cached_mask(plain, flip=False).tolist() == [[1.0, 1.0], [1.0, 1.0]]


class _Tensors:
    """The cache reader's interface with fixed tensors: latents 0, text 0, the mask of key m."""

    def latent(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(16, 2, 2), torch.full((16, 2, 2), -30.0)

    def text(self, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.zeros(768), torch.zeros(4, 4096), torch.ones(4, dtype=torch.uint8)

    def mask(self, key: str) -> torch.Tensor:
        return torch.tensor([[1.0, 0.0], [0.0, 0.0]])


def _item(row: int, is_reg: bool = False, mask: bool = False, **kw: object) -> TrainItem:
    return TrainItem(
        row=row,
        dataset=0,
        latent_keys=("l",),
        text_key="t",
        bucket=(16, 16),
        is_reg=is_reg,
        repeats=1,
        mask_keys=("m",) if mask else (),
        **kw,  # type: ignore[arg-type]
    )


def test_batches_carry_loss_weights_and_masks() -> None:
    items = [_item(0), _item(1, is_reg=True, mask=True)]
    batch = make_batch(items, [0, 1], _Tensors(), torch.Generator(), "cpu", torch.float32, prior_loss_weight=0.3)
    assert batch["loss_weights"].tolist() == pytest.approx([1.0, 0.3])
    assert batch["loss_mask"].tolist() == [[[1.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]]]  # ones if none
    assert make_batch(items[:1], [0], _Tensors(), torch.Generator(), "cpu", torch.float32)["loss_mask"] is None


def test_each_epoch_picks_its_caption_slot_or_the_empty_caption() -> None:
    slots = (("k0", "a, b"), ("k1", "b, a"))
    items = [_item(0, text_variants=slots, drop_every=3, empty_text="kE", caption="a, b")]
    picked = [(it.text_key, it.caption) for e in range(4) for it in epoch_captions(items, e)]
    assert picked == [("k0", "a, b"), ("k1", "b, a"), ("kE", ""), ("k1", "b, a")]


def test_a_mask_of_the_wrong_size_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "masks").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "img/a.png")
    (tmp_path / "img/a.txt").write_text("a photo\n")
    Image.new("RGB", (32, 32)).save(tmp_path / "masks/a.png")
    (tmp_path / "d.toml").write_text(
        f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n'
        f'image_dir = "{tmp_path / "img"}"\nconditioning_data_dir = "{tmp_path / "masks"}"\n'
    )
    (tmp_path / "c.yaml").write_text(
        f"dataset_config: {tmp_path / 'd.toml'}\ntrain:\n  network_module: networks.lora_flux\n  masked_loss: true\n"
    )
    code = main(["manifest", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "m.parquet")])
    lines = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("manifest:")]  # (tqdm)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("fluxpipe: error:") and "mask is 32x32 but its image" in lines[0]
    assert not (tmp_path / "m.parquet").exists()


def test_diff_output_preservation_trains_towards_the_base_prediction() -> None:
    from fluxpipe.lora.network import FluxLoRANetwork, LoraSpec
    from fluxpipe.maths.packing import image_ids, pack_latents, text_ids
    from fluxpipe.training.loss import FlowSettings, prediction_loss
    from tests.test_lora_network import WIDTH, tiny_flux

    dit = tiny_flux()
    net = FluxLoRANetwork(dit, LoraSpec(network_dim=4, network_alpha=4))
    net.apply_to()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # a LoRA that changes the output
    x0, noise = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    t = torch.tensor([0.3, 0.7])
    batch = {
        "latents": x0,
        "t5": torch.randn(2, 3, WIDTH, generator=g),
        "pooled": torch.randn(2, WIDTH, generator=g),
        "t5_mask": torch.ones(2, 3, dtype=torch.bool),
        "preserve": torch.tensor([True, False]),
    }
    m = FlowSettings(guidance_scale=1.0)
    img = pack_latents((1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise)

    def predict(multiplier: float) -> torch.Tensor:
        net.set_multiplier(multiplier)
        args = (img, image_ids(2, 4, 4), batch["t5"], text_ids(2, 3), t, batch["pooled"], torch.ones(2))
        return dit(*args)

    with torch.no_grad():
        got = prediction_loss(dit, batch, m, t, noise, network=net)
        plain = prediction_loss(dit, batch, m, t, noise)
        with_lora, base = predict(1.0), predict(0.0)
    net.set_multiplier(1.0)
    assert torch.allclose(got[0], ((with_lora[0] - base[0]) ** 2).mean(), rtol=1e-5)  # target: the base output
    assert torch.allclose(got[1], plain[1]) and not torch.allclose(got[0], plain[0])
    assert net.multiplier == 1.0
