"""ControlNet training on the demo (edge maps as control images): the saved layout, its effect on the base
model, exact resume, and the refused inputs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors import safe_open
from safetensors.torch import load_file

from fluxpipe.cli import main
from fluxpipe.tools.demo import CLIP_DIR, FILES, T5_DIR


def cn_command(demo: Path, out: Path, *extra: str, dataset: Path | None = None) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        str(demo / FILES["flux"]),
        "--clip_l",
        str(demo / FILES["clip_l"]),
        "--t5xxl",
        str(demo / FILES["t5xxl"]),
        "--ae",
        str(demo / FILES["ae"]),
        "--dataset_config",
        str(dataset or REPO / "config/demo/dataset.toml"),
        "--output_dir",
        str(out),
        "--output_name",
        "cn",
        "--learning_rate",
        "1e-3",
        "--optimizer_type",
        "AdamW",
        "--max_train_epochs",
        "2",
        "--mixed_precision",
        "bf16",
        "--gradient_checkpointing",
        "--save_every_n_epochs",
        "1",
        "--cache_latents",
        "--cache_text_encoder_outputs",
        "--clip_tokenizer",
        str(demo / CLIP_DIR),
        "--t5_tokenizer",
        str(demo / T5_DIR),
        *extra,
    ]


@pytest.fixture(autouse=True)
def _from_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


def base_output(demo: Path, controlnet: Path | None, hint: torch.Tensor) -> torch.Tensor:
    from fluxpipe.io.checkpoints import load_model
    from fluxpipe.models.controlnet import ControlledFlux, ControlNetFlux, load_controlnet_state

    dit = load_model(demo / FILES["flux"], "flux", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    kwargs = {
        "img": torch.randn(1, 16, 64, generator=g),
        "img_ids": torch.zeros(1, 16, 3),
        "txt": torch.randn(1, 8, dit.params.context_in_dim, generator=g),
        "txt_ids": torch.zeros(1, 8, 3),
        "timesteps": torch.tensor([0.5]),
        "y": torch.randn(1, dit.params.vec_in_dim, generator=g),
        "guidance": torch.tensor([1.0]),
    }
    with torch.no_grad():
        if controlnet is None:
            return dit(**kwargs)
        net = ControlNetFlux(dit.params)
        load_controlnet_state(net, load_file(str(controlnet)))
        return ControlledFlux(dit, net.eval(), hint)(**kwargs)


def test_demo_controlnet_trains_in_the_reference_layout(demo_dir: Path, tmp_path: Path) -> None:
    from fluxpipe.io.checkpoints import inspect_checkpoint
    from fluxpipe.models.controlnet import controlnet_key_shapes

    assert main(["train", "controlnet", *cn_command(demo_dir, tmp_path)]) == 0
    final = tmp_path / "cn.safetensors"
    assert (tmp_path / "cn-000001.safetensors").is_file()
    params = inspect_checkpoint(demo_dir / FILES["flux"], "flux").build().params
    with safe_open(str(final), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert f.metadata()["modelspec.architecture"] == "flux-1-dev/controlnet"
        assert f.get_tensor("controlnet_blocks.0.weight").abs().sum() > 0  # the zero-initialised layers learned
    assert shapes == controlnet_key_shapes(params)
    g = torch.Generator().manual_seed(1)
    hint_a, hint_b = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1, torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    plain = base_output(demo_dir, None, hint_a)
    with_a, with_b = base_output(demo_dir, final, hint_a), base_output(demo_dir, final, hint_b)
    assert not torch.allclose(plain, with_a, atol=1e-6) and not torch.allclose(with_a, with_b, atol=1e-7)


def test_resume_from_a_state_equals_the_uninterrupted_run(demo_dir: Path, tmp_path: Path) -> None:
    extra = ("--save_every_n_steps", "3", "--save_state", "--blocks_to_swap", "0")
    assert main(["train", "controlnet", *cn_command(demo_dir, tmp_path / "clean", *extra)]) == 0
    state = tmp_path / "clean/cn-step00000003-state"
    assert main(["train", "controlnet", *cn_command(demo_dir, tmp_path / "resumed", "--resume", str(state))]) == 0
    a, b = load_file(str(tmp_path / "clean/cn.safetensors")), load_file(str(tmp_path / "resumed/cn.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_dataset_without_conditioning_images_is_refused(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = (REPO / "config/demo/dataset.toml").read_text()
    plain = tmp_path / "plain.toml"
    plain.write_text("\n".join(line for line in toml.splitlines() if "conditioning_data_dir" not in line))
    assert main(["train", "controlnet", *cn_command(demo_dir, tmp_path / "out", dataset=plain)]) == 2
    assert "no conditioning image" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("setting", "bucket", "says"),
    [
        ("random_crop = true", "true", "random_crop"),
        ("face_crop_aug_range = [2.0, 4.0]", "false", "face_crop_aug_range"),
    ],
)
def test_a_crop_drawn_each_step_is_refused_before_any_work(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, bucket: str, says: str
) -> None:
    """The conditioning image is cut at the target's centred crop (as the reference's ControlNetDataset, which
    refuses random_crop): a crop drawn each step would train on misaligned pairs. Latent caching off, so only
    the ControlNet rule can refuse it; nothing is written."""
    toml = (REPO / "config/demo/dataset.toml").read_text()
    toml = re.sub(r"enable_bucket = \w+", f"enable_bucket = {bucket}", toml)
    cropped = tmp_path / "cropped.toml"
    cropped.write_text(toml.replace("[[datasets.subsets]]", f"[[datasets.subsets]]\n{setting}", 1))
    flags = [f for f in cn_command(demo_dir, tmp_path / "out", dataset=cropped) if f != "--cache_latents"]
    assert main(["train", "controlnet", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and "ControlNet" in err[0] and "cropped.toml" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (("--loss_type", "huber", "--huber_schedule", "constant"), "l2 or l1"),
        (("--network_dim", "4"), "not implemented yet"),
        (("--fused_backward_pass",), "Adafactor"),
    ],
)
def test_refused_flags(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple, says: str
) -> None:
    assert main(["train", "controlnet", *cn_command(demo_dir, tmp_path, *extra)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


def test_a_wrong_starting_controlnet_is_one_error(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"controlnet_blocks.0.weight": torch.zeros(3, 3)}, str(bad))
    args = cn_command(demo_dir, tmp_path / "out", "--controlnet_model_name_or_path", str(bad))
    assert main(["train", "controlnet", *args]) == 2
    assert "missing keys" in capsys.readouterr().err
