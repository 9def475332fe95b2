"""The one strict loader: every bad file gets a CheckpointError that names the file and the fix."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import write_st

from fluxpipe.errors import CheckpointError
from fluxpipe.io.checkpoints import detect_kind, inspect_checkpoint, load_model
from fluxpipe.models import AutoEncoder, Flux
from fluxpipe.models.autoencoder import tiny_ae
from fluxpipe.models.flux import tiny


def tiny_flux_state(guidance: bool = True, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.to(dtype) for k, v in Flux(tiny(guidance)).state_dict().items()}


@pytest.fixture()
def flux_file(tmp_path: Path) -> Path:
    return write_st(tmp_path / "flux1-dev.safetensors", tiny_flux_state())


def test_load_is_strict_and_exact(flux_file: Path) -> None:
    model = load_model(flux_file, "flux")
    for k, v in tiny_flux_state().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())


def test_missing_key_is_listed(tmp_path: Path) -> None:
    state = tiny_flux_state()
    del state["double_blocks.1.txt_mlp.2.bias"]
    path = write_st(tmp_path / "f.safetensors", state)
    with pytest.raises(CheckpointError, match=r"1 missing keys: double_blocks\.1\.txt_mlp\.2\.bias"):
        load_model(path, "flux")


def test_unexpected_key_is_listed(tmp_path: Path) -> None:
    state = tiny_flux_state() | {"double_blocks.0.img_attn.extra": torch.zeros(2)}
    path = write_st(tmp_path / "f.safetensors", state)
    with pytest.raises(CheckpointError, match=r"1 unexpected keys: double_blocks\.0\.img_attn\.extra"):
        inspect_checkpoint(path, "flux")


def test_wrong_shape_matches_no_variant(tmp_path: Path) -> None:
    state = tiny_flux_state()
    state["single_blocks.0.linear2.weight"] = torch.zeros(64, 100)
    path = write_st(tmp_path / "f.safetensors", state)
    with pytest.raises(CheckpointError, match="shape mismatches: single_blocks.0.linear2.weight"):
        inspect_checkpoint(path, "flux")


def test_channels_that_match_no_flux_variant(tmp_path: Path) -> None:
    state = tiny_flux_state()
    state["img_in.weight"] = torch.zeros(64, 48)
    path = write_st(tmp_path / "f.safetensors", state)
    with pytest.raises(CheckpointError, match="match no FLUX.1 flux variant"):
        inspect_checkpoint(path, "flux")


def test_comfyui_prefix_is_stripped(tmp_path: Path) -> None:
    state = {"model.diffusion_model." + k: v for k, v in tiny_flux_state().items()}
    model = load_model(write_st(tmp_path / "comfy.safetensors", state), "flux")
    torch.testing.assert_close(model.img_in.weight, tiny_flux_state()["img_in.weight"])


def test_fp8_e4m3fn_file_loads_as_stored_or_cast(tmp_path: Path) -> None:
    state = tiny_flux_state(dtype=torch.float8_e4m3fn)
    path = write_st(tmp_path / "fp8.safetensors", state)
    assert inspect_checkpoint(path, "flux").dtypes() == {"fp8_e4m3fn": len(state)}
    stored = load_model(path, "flux")
    assert stored.img_in.weight.dtype == torch.float8_e4m3fn
    cast = load_model(path, "flux", dtype=torch.bfloat16)
    assert torch.equal(cast.img_in.weight, state["img_in.weight"].to(torch.bfloat16))


def test_other_fp8_variants_are_refused(tmp_path: Path) -> None:
    path = write_st(tmp_path / "e5m2.safetensors", tiny_flux_state(dtype=torch.float8_e5m2))
    with pytest.raises(CheckpointError, match="F8_E5M2 is not supported; only float8_e4m3fn"):
        inspect_checkpoint(path, "flux")


def test_schnell_and_dev_are_told_apart(tmp_path: Path) -> None:
    path = write_st(tmp_path / "s.safetensors", tiny_flux_state(guidance=False))
    assert inspect_checkpoint(path, "flux").describe()["variant"] == "schnell"


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_suffixes_are_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04anything")
    with pytest.raises(CheckpointError, match="pickle-based"):
        inspect_checkpoint(path, "flux")


def test_pickle_bytes_under_a_safetensors_name_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    torch.save({"x": torch.zeros(1)}, path)  # a zip/pickle archive: must be refused, never unpickled
    with pytest.raises(CheckpointError, match="never unpickles"):
        inspect_checkpoint(path, "flux")


def test_truncated_file(tmp_path: Path, flux_file: Path) -> None:
    data = flux_file.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        inspect_checkpoint(path, "flux")


@pytest.mark.parametrize("content", [b"", b"abc", struct.pack("<Q", 10**12) + b"{}", struct.pack("<Q", 4) + b"{{{{"])
def test_corrupt_or_empty_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        inspect_checkpoint(path, "flux")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="file not found"):
        inspect_checkpoint(tmp_path / "nope.safetensors", "ae")


def test_diffusers_folder_is_refused_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(CheckpointError, match="Diffusers-format folder.*flux1-dev.safetensors and ae.safetensors"):
        inspect_checkpoint(tmp_path, "flux")


def test_diffusers_transformer_file_is_refused(tmp_path: Path) -> None:
    state = {"transformer_blocks.0.attn.add_k_proj.bias": torch.zeros(4), "x_embedder.weight": torch.zeros(4, 4)}
    path = write_st(tmp_path / "diffusion_pytorch_model.safetensors", state)
    with pytest.raises(CheckpointError, match="Diffusers-format FLUX transformer"):
        inspect_checkpoint(path, "flux")


def test_diffusers_vae_file_is_refused(tmp_path: Path) -> None:
    state = {"encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(1), "encoder.conv_in.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="Diffusers-format autoencoder"):
        inspect_checkpoint(write_st(tmp_path / "vae.safetensors", state), "ae")


@pytest.mark.parametrize(
    ("given", "slot", "says"),
    [
        ("ae", "flux", "is a FLUX.1 autoencoder .* given as a FLUX.1 DiT"),
        ("flux", "ae", "is a FLUX.1 DiT .* given as a FLUX.1 autoencoder"),
        ("t5xxl", "clip_l", "is a T5-XXL text encoder .* given as a CLIP-L"),
        ("clip_l", "t5xxl", "is a CLIP-L text encoder .* given as a T5-XXL"),
    ],
)
def test_wrong_model_in_a_slot(demo_dir: Path, given: str, slot: str, says: str) -> None:
    from fluxpipe.tools.demo import FILES

    with pytest.raises(CheckpointError, match=says):
        inspect_checkpoint(demo_dir / FILES[given], slot)


def test_lora_given_as_model_is_named(tmp_path: Path) -> None:
    path = write_st(tmp_path / "l.safetensors", {"lora_unet_img_in.lora_down.weight": torch.zeros(2, 64)})
    with pytest.raises(CheckpointError, match="is a LoRA"):
        inspect_checkpoint(path, "flux")


def test_autoencoder_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = AutoEncoder(tiny_ae()).state_dict()
    model = load_model(write_st(tmp_path / "ae.safetensors", state), "ae")
    assert torch.equal(model.decoder.conv_out.weight, state["decoder.conv_out.weight"])


def test_detect_kind_from_keys() -> None:
    assert detect_kind({"double_blocks.0.img_attn.qkv.weight"}) == "flux"
    assert detect_kind({"controlnet_blocks.0.weight", "double_blocks.0.img_attn.qkv.weight"}) == "controlnet"
    assert detect_kind({"text_model.embeddings.token_embedding.weight"}) == "clip_l"
    assert detect_kind({"shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"}) == "t5xxl"
    assert detect_kind({"foo"}) == "unknown"
