"""Kontext LoRA training: the loss on target tokens only, the cached reference latents, `train lora --model_type kontext`.

The loss is checked against the naive float64 reference of the official Kontext formulas
(tests/test_kontext_reference.py); the cached reference latent against the AE's own encoding of the edge map
resized and cropped like its photo; the command on the demo set (photos paired with their edge maps).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors import safe_open

from fluxpipe.cli import main
from fluxpipe.training.loss import FlowSettings, prediction_loss
from fluxpipe.tools.demo import FILES
from tests.test_flux_reference import AXES, L_TXT, make_model, reference_flux
from tests.test_kontext_reference import naive_ids, naive_pack
from tests.test_train_lora import seed_command

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _from_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


def test_prediction_loss_with_a_reference_is_the_target_tokens_loss() -> None:
    model = make_model(guidance_embed=True)
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x0, noise, ref = r(2, 16, 4, 4), r(2, 16, 4, 4), r(2, 16, 4, 6)
    t = torch.tensor([0.7, 0.2], dtype=torch.float64)
    batch = {
        "latents": x0,
        "reference": ref,
        "t5": r(2, L_TXT, 24),
        "pooled": r(2, 16),
        "t5_mask": torch.ones(2, L_TXT, dtype=torch.bool),
    }
    with torch.no_grad():
        got = prediction_loss(model, batch, FlowSettings(guidance_scale=1.0), t, noise)
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
    seq = torch.cat([naive_pack(x_t), naive_pack(ref)], 1)
    ids = torch.cat([naive_ids(2, 2, 2, 0.0), naive_ids(2, 2, 3, 1.0)], 1)
    pred = reference_flux(
        model.state_dict(),
        AXES,
        10_000,
        seq,
        ids,
        batch["t5"],
        torch.zeros(2, L_TXT, 3).double(),
        t,
        batch["pooled"],
        torch.ones(2, dtype=torch.float64),
    )[:, :4]
    expected = ((pred - naive_pack(noise - x0)) ** 2).mean(dim=(1, 2))
    assert torch.allclose(got.double(), expected, rtol=1e-6, atol=0)
    without = prediction_loss(model, {k: v for k, v in batch.items() if k != "reference"}, FlowSettings(), t, noise)
    assert not torch.allclose(without.double(), expected, rtol=1e-3)  # the reference tokens change the loss


def kontext_command(demo: Path, out: Path, *extra: str) -> list[str]:
    args = seed_command(demo, out, "--network_train_unet_only", "--model_type", "kontext", *extra)
    args[args.index("--max_train_epochs") + 1] = "1"
    args[args.index("--mixed_precision") + 1] = "no"
    return args


def test_train_lora_kontext_on_the_paired_demo_set(demo_dir: Path, tmp_path: Path) -> None:
    assert main(["train", "lora", *kontext_command(demo_dir, tmp_path)]) == 0
    assert (tmp_path / "my_flux_lora.safetensors").is_file()
    from fluxpipe.data.images import load_rgb, resize_and_crop, to_tensor
    from fluxpipe.io.checkpoints import load_model
    from fluxpipe.io.tables import read_parquet

    cache = tmp_path / ".fluxpipe-cache"
    index, _ = read_parquet(cache / "cache/latents/index.parquet")
    manifest, _ = read_parquet(cache / "dataset/manifest.parquet")
    refs = index[index.kind.fillna("") == "reference"]
    assert len(refs) == len(manifest)  # one reference entry per photo (no flip_aug in the demo)
    row = manifest.iloc[0]
    entry = refs[refs.path == row.path].iloc[0]
    assert json.loads(entry.bucket) == [int(row.bucket_w), int(row.bucket_h)]
    image = resize_and_crop(
        load_rgb(Path(row.conditioning)),
        (int(row.resized_w), int(row.resized_h)),
        int(row.crop_left),
        int(row.crop_top),
        (int(row.bucket_w), int(row.bucket_h)),
    )
    ae = load_model(demo_dir / FILES["ae"], "ae", dtype=torch.float32, device="cpu")
    with torch.no_grad():
        mean = ae.encoder(to_tensor(image)[None]).chunk(2, dim=1)[0][0]
    with safe_open(str(cache / "cache/latents" / entry.shard), "pt") as f:
        cached = f.get_tensor(f"{entry.key}.mean")
    assert torch.allclose(cached, mean, atol=1e-5)
    target = index[(index.kind.fillna("") == "") & (index.path == row.path)].iloc[0]
    assert target.key != entry.key


def test_kontext_without_reference_images_is_one_error_line(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = (REPO / "config/demo/dataset.toml").read_text()
    plain = tmp_path / "plain.toml"
    plain.write_text("\n".join(line for line in toml.splitlines() if "conditioning_data_dir" not in line))
    args = kontext_command(demo_dir, tmp_path / "out")
    args[args.index("--dataset_config") + 1] = str(plain)
    assert main(["train", "lora", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no conditioning_data_dir" in err[0], err
