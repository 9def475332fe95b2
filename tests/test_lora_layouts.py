"""LoRA files in the diffusers/PEFT, ai-toolkit and BFL layouts load as the deltas they describe (issue 14, item 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from fluxpipe.cli import main
from fluxpipe.errors import CheckpointError
from fluxpipe.tools.demo import CLIP_DIR, FILES, T5_DIR
from tests.conftest import write_st

H = 64  # the demo DiT's hidden size (mlp 256)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)))


def peft_lora(prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """to_q and to_v of double block 0 (no to_k), proj_mlp of single block 1, norm_out, one plain Linear."""
    sd = {}
    for i, (name, out, inp) in enumerate(
        [
            ("transformer_blocks.0.attn.to_q", H, H),
            ("transformer_blocks.0.attn.to_v", H, H),
            ("single_transformer_blocks.1.proj_mlp", 4 * H, H),
            ("norm_out.linear", 2 * H, H),
            ("transformer_blocks.1.ff.net.2", H, 4 * H),
        ]
    ):
        sd[f"{prefix}{name}.lora_A.weight"] = rand(2 + i % 2, inp, seed=i)
        sd[f"{prefix}{name}.lora_B.weight"] = rand(out, 2 + i % 2, seed=10 + i)
    return sd


def test_layouts_are_classified_by_every_key() -> None:
    from fluxpipe.lora.layouts import classify

    assert classify(["lora_unet_img_in.lora_down.weight", "lora_te1_text_model_x.alpha"]) == "kohya"
    assert classify(list(peft_lora())) == "diffusers"
    assert classify(list(peft_lora("diffusion_model."))) == "ai-toolkit"
    assert classify(["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"]) == "bfl"
    assert classify(["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"]) == "diffusers"
    with pytest.raises(CheckpointError, match=r"1 of 3 keys .*transformer\.transformer_blocks\.0\.attn\.to_zz"):
        classify(
            [
                "lora_unet_img_in.lora_down.weight",
                "lora_unet_img_in.lora_up.weight",
                "transformer.transformer_blocks.0.attn.to_zz.lora_A.weight",
            ]
        )
    with pytest.raises(CheckpointError, match="mix LoRA layouts"):
        classify(["lora_unet_img_in.lora_down.weight", "transformer.x_embedder.lora_A.weight"])


def test_peft_slices_become_one_fused_lora_with_the_hand_computed_delta(demo_dir: Path, tmp_path: Path) -> None:
    from fluxpipe.inference.sampler import load_lora
    from fluxpipe.io.checkpoints import load_model
    from fluxpipe.lora.files import apply_lora

    sd = peft_lora()
    path = write_st(
        tmp_path / "peft.safetensors",
        sd,
        {
            "lora_adapter_metadata": json.dumps(
                {"transformer.r": 2, "transformer.lora_alpha": 4, "transformer.alpha_pattern": {"ff.net.2": 6}}
            )
        },
    )
    layout, kohya = load_lora(path)
    assert layout == "diffusers"
    base = load_model(demo_dir / FILES["flux"], "flux", dtype=torch.float32)
    dit = load_model(demo_dir / FILES["flux"], "flux", dtype=torch.float32)
    assert apply_lora(dit, kohya, 0.5) == 4  # qkv (q, v), linear1 (mlp), final adaLN, img_mlp.2
    a = lambda n: sd[f"transformer.{n}.lora_A.weight"]  # noqa: E731
    b = lambda n: sd[f"transformer.{n}.lora_B.weight"]  # noqa: E731
    # PEFT scale lora_alpha / rank (alpha_pattern for ff.net.2), multiplier 0.5; k rows untouched
    q, v = "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v"
    want = torch.cat([b(q) @ a(q) * 4 / 2, torch.zeros(H, H), b(v) @ a(v) * 4 / 3]) * 0.5
    got = dit.double_blocks[0].img_attn.qkv.weight - base.double_blocks[0].img_attn.qkv.weight
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    m = "single_transformer_blocks.1.proj_mlp"
    got = dit.single_blocks[1].linear1.weight - base.single_blocks[1].linear1.weight
    torch.testing.assert_close(got, torch.cat([torch.zeros(3 * H, H), b(m) @ a(m) * 4 / 2 * 0.5]), rtol=1e-5, atol=2e-5)
    delta = b("norm_out.linear") @ a("norm_out.linear") * 4 / 3 * 0.5  # diffusers (scale, shift) -> BFL (shift, scale)
    got = dit.final_layer.adaLN_modulation[1].weight - base.final_layer.adaLN_modulation[1].weight
    torch.testing.assert_close(got, torch.cat([delta[H:], delta[:H]]), rtol=1e-5, atol=2e-5)
    f = "transformer_blocks.1.ff.net.2"
    got = dit.double_blocks[1].img_mlp[2].weight - base.double_blocks[1].img_mlp[2].weight
    torch.testing.assert_close(got, b(f) @ a(f) * 6 / 2 * 0.5, rtol=1e-5, atol=2e-5)


def test_bfl_keys_with_alpha_keys(tmp_path: Path) -> None:
    from fluxpipe.inference.sampler import load_lora
    from fluxpipe.lora.files import parse_lora

    down, up = rand(4, H), rand(3 * H, 4)
    path = write_st(
        tmp_path / "bfl.safetensors",
        {
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": down,
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": up,
            "diffusion_model.double_blocks.0.img_attn.qkv.alpha": torch.tensor(2.0),
        },
    )
    layout, kohya = load_lora(path)
    pair = parse_lora(kohya)["lora_unet_double_blocks_0_img_attn_qkv"]
    assert layout == "bfl"
    torch.testing.assert_close(pair.delta(), up @ down * 2 / 4)


def test_non_loras_are_refused_naming_what_they_are(demo_dir: Path, tmp_path: Path) -> None:
    from fluxpipe.inference.sampler import load_lora

    with pytest.raises(CheckpointError, match=r"flux1-dev.safetensors \(--lora\): is a FLUX.1 DiT"):
        load_lora(demo_dir / FILES["flux"])
    bad = write_st(
        tmp_path / "dora.safetensors",
        {"transformer.x_embedder.lora_A.weight": rand(2, 64), "transformer.x_embedder.lora_magnitude_vector": rand(64)},
    )
    with pytest.raises(CheckpointError, match="x_embedder.lora_magnitude_vector"):
        load_lora(bad)


def test_sample_with_a_peft_lora_changes_the_image(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "models:\n"
        + "".join(f"  {k}: {demo_dir / FILES[k]}\n" for k in ("flux", "ae", "clip_l", "t5xxl"))
        + f"  clip_tokenizer: {demo_dir / CLIP_DIR}\n  t5_tokenizer: {demo_dir / T5_DIR}\n"
    )
    peft = write_st(tmp_path / "peft.safetensors", {k: v * 3 for k, v in peft_lora().items()})
    base = [
        "sample",
        "--config",
        str(config),
        "--prompt",
        "a cat",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--device",
        "cpu",
    ]
    assert main([*base, "--out", str(tmp_path / "none.png")]) == 0
    assert main([*base, "--lora", str(peft), "--out", str(tmp_path / "peft.png")]) == 0
    with Image.open(tmp_path / "none.png") as a, Image.open(tmp_path / "peft.png") as b:
        assert a.tobytes() != b.tobytes()  # before: keys outside lora_unet_ were dropped, the image was the base one
    assert f"{peft}: diffusers, 4 modules patched (0 text-encoder)" in capsys.readouterr().out
    assert main([*base, "--lora", str(demo_dir / FILES["flux"]), "--out", str(tmp_path / "x.png")]) == 2
    assert "is a FLUX.1 DiT" in capsys.readouterr().err


def test_a_header_length_ending_in_0x80_is_not_taken_for_pickle(tmp_path: Path) -> None:
    from fluxpipe.io.safetensors_file import read_header

    for pad in range(300):  # header lengths 8-aligned: some end in 0x80 (pickle's first byte)
        path = write_st(tmp_path / "x.safetensors", {"a" * (pad + 1): torch.zeros(1)})
        if path.read_bytes()[:1] == b"\x80":
            assert list(read_header(path).tensors) == ["a" * (pad + 1)]
            return
    pytest.fail("no header length ending in 0x80 was produced")


def test_peft_scale_reads_alpha_pattern_and_refuses_what_is_not_a_number() -> None:
    from fluxpipe.lora.layouts import peft_scale

    config = {"transformer.lora_alpha": 8, "transformer.alpha_pattern": {"proj_out": 2}}
    assert peft_scale("transformer.blocks.0.attn", 4, None, config) == 2.0  # 8 / 4
    assert peft_scale("transformer.blocks.0.proj_out", 4, None, config) == 0.5  # the pattern's 2 / 4
    assert peft_scale("transformer.x", 4, torch.tensor(2.0), config) == 0.5  # an .alpha key comes first
    with pytest.raises(CheckpointError, match="lora_alpha of transformer.x: 'eight' is not a number"):
        peft_scale("transformer.x", 4, None, {"transformer.lora_alpha": "eight"})
    with pytest.raises(CheckpointError, match="alpha_pattern: \\['proj_out'\\] is not a mapping"):
        peft_scale("transformer.x", 4, None, {"transformer.lora_alpha": 8, "transformer.alpha_pattern": ["proj_out"]})
