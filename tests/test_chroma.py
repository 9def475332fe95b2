"""Chroma files: strict loading of the Chroma1-Base layout, FLUX/Chroma mix-ups refused in one line (exit 2),
the validate stage with --model-type chroma, and the tiny demo file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import write_st

from fluxpipe.cli import main
from fluxpipe.errors import CheckpointError
from fluxpipe.io.checkpoints import dit_slot, inspect_checkpoint, load_model
from fluxpipe.models.chroma import CHROMA, Chroma, block_modulations, chroma_key_mask, is_chroma
from fluxpipe.tools.demo import FILES, write_chroma_demo

# the Chroma1-Base layout for one block of each kind (hand-written from the file's key list, not from the model)
EXPECTED_KEYS = {
    "img_in.weight",
    "img_in.bias",
    "txt_in.weight",
    "txt_in.bias",
    "distilled_guidance_layer.in_proj.weight",
    "distilled_guidance_layer.in_proj.bias",
    "distilled_guidance_layer.out_proj.weight",
    "distilled_guidance_layer.out_proj.bias",
    "final_layer.linear.weight",
    "final_layer.linear.bias",
    *(f"distilled_guidance_layer.norms.{i}.scale" for i in range(5)),
    *(
        f"distilled_guidance_layer.layers.{i}.{n}.{w}"
        for i in range(5)
        for n in ("in_layer", "out_layer")
        for w in ("weight", "bias")
    ),
    *(
        f"double_blocks.0.{s}_{n}.{w}"
        for s in ("img", "txt")
        for n in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")
        for w in ("weight", "bias")
    ),
    *(f"double_blocks.0.{s}_attn.norm.{q}_norm.scale" for s in ("img", "txt") for q in ("query", "key")),
    *(f"single_blocks.0.{n}.{w}" for n in ("linear1", "linear2") for w in ("weight", "bias")),
    *(f"single_blocks.0.norm.{q}_norm.scale" for q in ("query", "key")),
}


def test_full_size_chroma_has_the_official_keys_and_shapes() -> None:
    with torch.device("meta"):
        model = Chroma(CHROMA)
    state = model.state_dict()
    assert {k for k in state if not re.match(r"(double|single)_blocks\.[1-9]", k)} == EXPECTED_KEYS
    assert len({k.split(".")[1] for k in state if k.startswith("double_blocks.")}) == 19
    assert len({k.split(".")[1] for k in state if k.startswith("single_blocks.")}) == 38
    assert tuple(state["distilled_guidance_layer.in_proj.weight"].shape) == (5120, 64)
    assert tuple(state["distilled_guidance_layer.out_proj.weight"].shape) == (3072, 5120)
    assert tuple(state["single_blocks.0.linear1.weight"].shape) == (3 * 3072 + 4 * 3072, 3072)
    assert CHROMA.mod_index_length == 344  # 3 x 38 + 6 x 19 x 2 + 2
    # about 8.9 B parameters (Chroma1-Base: 8.9 B)
    assert 8.8e9 < sum(p.numel() for p in model.parameters()) < 9.0e9


def test_modulation_rows_per_block() -> None:
    rows = torch.arange(344.0)[None, :, None]  # row j holds the value j
    assert block_modulations(rows, CHROMA, "single", 37).flatten().tolist() == [111, 112, 113]
    double = block_modulations(rows, CHROMA, "double", 1).flatten().tolist()
    assert double == [*range(114 + 6, 114 + 12), *range(114 + 114 + 6, 114 + 114 + 12)]
    assert block_modulations(rows, CHROMA, "final").flatten().tolist() == [342, 343]


def test_key_mask_attends_one_padding_token() -> None:
    mask = chroma_key_mask(torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]), n_img=2)
    assert mask[:, 0, 0].int().tolist() == [[1, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 1, 1]]


def test_demo_chroma_loads_strictly(tmp_path: Path) -> None:
    path = write_chroma_demo(tmp_path)
    spec = inspect_checkpoint(path, "chroma")
    assert spec.describe()["variant"] == "chroma"
    model = load_model(path, "chroma", dtype=torch.float32)
    assert is_chroma(model)
    from safetensors.torch import load_file

    stored = load_file(str(path))
    assert set(stored) == set(model.state_dict())
    assert all(torch.equal(stored[k].float(), v) for k, v in model.state_dict().items())
    # ComfyUI's prefix is accepted as for FLUX
    prefixed = write_st(tmp_path / "comfy.safetensors", {"model.diffusion_model." + k: v for k, v in stored.items()})
    assert is_chroma(load_model(prefixed, "chroma"))


def test_a_missing_or_extra_key_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    stored = load_file(str(write_chroma_demo(tmp_path)))
    del stored["distilled_guidance_layer.norms.1.scale"]
    with pytest.raises(CheckpointError, match=r"1 missing keys: distilled_guidance_layer\.norms\.1\.scale"):
        inspect_checkpoint(write_st(tmp_path / "missing.safetensors", stored), "chroma")
    stored |= {
        "distilled_guidance_layer.norms.1.scale": torch.ones(96),
        "double_blocks.0.img_mod.lin.weight": torch.ones(384, 64),
    }
    with pytest.raises(CheckpointError, match=r"unexpected keys: double_blocks\.0\.img_mod\.lin\.weight"):
        inspect_checkpoint(write_st(tmp_path / "extra.safetensors", stored), "chroma")


def test_dit_slot_per_model_type() -> None:
    assert [dit_slot(t) for t in ("flux", "kontext", "chroma")] == ["flux", "flux", "chroma"]
    with pytest.raises(CheckpointError, match="--model_type sd3: unknown"):
        dit_slot("sd3")


def test_chroma_given_as_flux_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_chroma_demo(tmp_path)
    assert main(["validate", "--flux", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"fluxpipe: error: {path}: is a Chroma DiT (Chroma1-Base.safetensors), but was loaded as a FLUX.1 DiT "
        "(flux1-dev/flux1-schnell.safetensors); use --model_type chroma\n"
    )


def test_flux_given_as_chroma_is_one_line_exit_2(demo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = demo_dir / FILES["flux"]
    assert main(["validate", "--flux", str(path), "--model-type", "chroma"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"fluxpipe: error: {path}: is a FLUX.1 DiT (flux1-dev/flux1-schnell.safetensors), but was loaded as a "
        "Chroma DiT (Chroma1-Base.safetensors); use --model_type flux\n"
    )


def test_validate_a_chroma_set(demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_chroma_demo(tmp_path)
    out = tmp_path / "report.json"
    args = ["validate", "--model-type", "chroma", "--flux", str(path), "--ae", str(demo_dir / FILES["ae"])]
    args += ["--t5xxl", str(demo_dir / FILES["t5xxl"]), "--out", str(out), "--hash-cache", str(tmp_path / "h.json")]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == "ok: chroma, ae, t5xxl valid (Chroma)"
    import json

    report = json.loads(out.read_text())
    assert report["variant"] == "chroma"
    assert report["models"]["chroma"]["depth"] == 2
    assert main([*args, "--clip-l", str(demo_dir / FILES["clip_l"])]) == 2
    assert "Chroma uses no CLIP-L" in capsys.readouterr().err
