"""Interop with diffusers and peft (real clients from PyPI, the `dev` extra): fluxpipe's DiT file and LoRA load in
diffusers, a diffusers/PEFT LoRA loads in fluxpipe, and both sides compute the same numbers.

diffusers' FLUX converters hard-code FLUX.1's widths (``inner_dim = 3072``, single-block splits
``[3072, 3072, 3072, 12288]``); a test-only patch rewrites those two constants to the demo DiT's width (64) in
copies of the converter functions, so the models stay tiny (the real widths cost ~2 GB per block pair in fp32).
Everything else is diffusers' own code.
"""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from fluxpipe.tools.demo import CLIP_DIR, FILES, T5_DIR  # noqa: E402

H, HEADS = 64, 2  # the demo DiT: hidden 64, 2 heads of 32 (axes 4, 14, 14), 2 + 2 blocks, text widths 64


def narrowed(fn, width: int):  # noqa: ANN001, ANN201
    """A copy of a diffusers converter with FLUX.1's hard-coded widths replaced by ``width``."""
    src = textwrap.dedent(inspect.getsource(fn))
    new = src.replace("inner_dim = 3072", f"inner_dim = {width}").replace(
        "dims=[3072, 3072, 3072, 12288]", f"dims=[{width}, {width}, {width}, {4 * width}]"
    )
    assert new != src, f"diffusers' {fn.__name__} no longer has the constants this test patches"
    scope = dict(fn.__globals__)
    exec(compile(new, inspect.getsourcefile(fn), "exec"), scope)  # noqa: S102
    return scope[fn.__name__]


@pytest.fixture
def narrow(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers.loaders import lora_pipeline, single_file_model, single_file_utils

    convert = narrowed(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers, H)
    monkeypatch.setitem(
        single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"], "checkpoint_mapping_fn", convert
    )
    monkeypatch.setattr(single_file_utils, "convert_flux_transformer_checkpoint_to_diffusers", convert)
    monkeypatch.setattr(
        lora_pipeline,
        "_convert_kohya_flux_lora_to_diffusers",
        narrowed(lora_pipeline._convert_kohya_flux_lora_to_diffusers, H),
    )


def diffusers_config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "FluxTransformer2DModel",
                "patch_size": 1,
                "in_channels": 64,
                "num_layers": 2,
                "num_single_layers": 2,
                "attention_head_dim": H // HEADS,
                "num_attention_heads": HEADS,
                "joint_attention_dim": 64,
                "pooled_projection_dim": 64,
                "guidance_embeds": True,
                "axes_dims_rope": [4, 14, 14],
            }
        )
    )
    return folder


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    img_ids = torch.zeros(6, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(6) // 3, torch.arange(6) % 3
    return {
        "img": torch.randn(1, 6, 64, generator=g),
        "txt": torch.randn(1, 4, 64, generator=g),
        "y": torch.randn(1, 64, generator=g),
        "t": torch.tensor([0.7]),
        "g": torch.tensor([3.5]),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(4, 3),
    }


@torch.no_grad()
def run_fluxpipe(dit: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return dit(x["img"], x["img_ids"][None], x["txt"], x["txt_ids"][None], x["t"], x["y"], guidance=x["g"])


@torch.no_grad()
def run_diffusers(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(
        hidden_states=x["img"],
        encoder_hidden_states=x["txt"],
        pooled_projections=x["y"],
        timestep=x["t"],
        guidance=x["g"],
        img_ids=x["img_ids"],
        txt_ids=x["txt_ids"],
        return_dict=False,
    )[0]


def load_both(demo_dir: Path, tmp_path: Path):  # noqa: ANN201
    from diffusers import FluxTransformer2DModel

    from fluxpipe.io.checkpoints import load_model

    dit = load_model(demo_dir / FILES["flux"], "flux", dtype=torch.float32).eval()
    model = FluxTransformer2DModel.from_single_file(
        str(demo_dir / FILES["flux"]),
        config=str(diffusers_config(tmp_path / "cfg")),
        torch_dtype=torch.float32,
        local_files_only=True,
    ).eval()
    return dit, model


def test_fluxpipe_dit_file_loads_in_diffusers_every_key_used(demo_dir: Path, tmp_path: Path, narrow: None) -> None:
    from diffusers.loaders import single_file_utils
    from safetensors.torch import load_file

    dit, model = load_both(demo_dir, tmp_path)
    state = load_file(demo_dir / FILES["flux"])
    converted = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(state)
    assert state == {}  # the converter pops what it uses: every key of fluxpipe's file was used
    assert set(converted) == set(model.state_dict())
    x = inputs()
    torch.testing.assert_close(run_diffusers(model, x), run_fluxpipe(dit, x), rtol=1e-4, atol=1e-5)


def test_fluxpipe_lora_loads_in_diffusers_kohya_converter(demo_dir: Path, tmp_path: Path, narrow: None) -> None:
    from diffusers import FluxPipeline

    from fluxpipe.inference.sampler import load_lora
    from fluxpipe.lora.files import apply_lora
    from fluxpipe.lora.network import FluxLoRANetwork, LoraSpec

    dit, model = load_both(demo_dir, tmp_path)
    # no in_dims: diffusers' kohya converter names the conditioning layers' LoRAs without the "transformer." prefix,
    # and load_lora_weights then drops them silently (diffusers 0.42.1)
    net = FluxLoRANetwork(dit, LoraSpec(network_dim=4, network_alpha=2.0))
    g = torch.Generator().manual_seed(1)
    for m in net.loras:
        m.lora_up.weight.data = torch.randn(m.lora_up.weight.shape, generator=g) * 0.05
    path = tmp_path / "fluxpipe_lora.safetensors"
    net.save(path)
    kohya_modules = len(net.loras)
    converted = FluxPipeline.lora_state_dict(str(path))  # diffusers' kohya converter (raises on unknown keys)
    fused = sum(n.endswith(("_qkv", "_linear1")) for n in (m.lora_name for m in net.loras))
    linear1 = sum(m.lora_name.endswith("_linear1") for m in net.loras)
    assert sum(k.endswith("lora_A.weight") for k in converted) == kohya_modules + 2 * fused + linear1
    pipe = FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=model,
    )
    pipe.load_lora_weights(str(path))
    patched = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert len(patched) == kohya_modules + 2 * fused + linear1  # every converted module found its layer
    layout, kohya = load_lora(path)
    assert layout == "kohya" and apply_lora(dit, kohya) == kohya_modules
    x = inputs()
    torch.testing.assert_close(run_diffusers(model, x), run_fluxpipe(dit, x), rtol=1e-4, atol=1e-5)


PEFT_TARGETS = (
    r".*(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out|net\.0\.proj|net\.2|norm1\.linear|"
    r"norm1_context\.linear|proj_mlp|proj_out|norm\.linear|x_embedder|context_embedder|linear_[12]|"
    r"norm_out\.linear)$"
)


def test_peft_lora_loads_in_fluxpipe_sample(
    demo_dir: Path, tmp_path: Path, narrow: None, capsys: pytest.CaptureFixture
) -> None:
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from fluxpipe.cli import main
    from fluxpipe.inference.sampler import load_lora
    from fluxpipe.lora.files import apply_lora

    dit, model = load_both(demo_dir, tmp_path)
    torch.manual_seed(2)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS, init_lora_weights=False)
    model.add_adapter(config)
    peft_modules = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    FluxPipeline.save_lora_weights(
        tmp_path / "peft",
        transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    path = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
    layout, kohya = load_lora(path)
    # q, k, v of a block fuse into qkv; q, k, v, proj_mlp of a single block into linear1
    n = len(peft_modules) - 2 * 2 * 2 - 3 * 2
    assert layout == "diffusers" and apply_lora(dit, kohya) == n
    x = inputs()
    torch.testing.assert_close(run_fluxpipe(dit, x), run_diffusers(model, x), rtol=1e-4, atol=1e-5)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "models:\n"
        + "".join(f"  {k}: {demo_dir / FILES[k]}\n" for k in ("flux", "ae", "clip_l", "t5xxl"))
        + f"  clip_tokenizer: {demo_dir / CLIP_DIR}\n  t5_tokenizer: {demo_dir / T5_DIR}\n"
    )
    assert (
        main(
            [
                "sample",
                "--config",
                str(cfg),
                "--prompt",
                "a cat",
                "--width",
                "32",
                "--height",
                "32",
                "--steps",
                "1",
                "--device",
                "cpu",
                "--lora",
                str(path),
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
        == 0
    )
    assert f"{path}: diffusers, {n} modules patched (0 text-encoder)" in capsys.readouterr().out


def test_lora_convert_to_diffusers_loads_in_diffusers(demo_dir: Path, tmp_path: Path, narrow: None) -> None:
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    from fluxpipe.cli import main
    from fluxpipe.inference.sampler import load_lora
    from fluxpipe.lora.files import apply_lora
    from fluxpipe.lora.network import FluxLoRANetwork, LoraSpec

    dit, model = load_both(demo_dir, tmp_path)
    net = FluxLoRANetwork(dit, LoraSpec(network_dim=4, network_alpha=2.0, in_dims=(4, 4, 4, 4, 4)))
    g = torch.Generator().manual_seed(3)
    for m in net.loras:
        m.lora_up.weight.data = torch.randn(m.lora_up.weight.shape, generator=g) * 0.05
    net.save(tmp_path / "k.safetensors")
    out = tmp_path / "d.safetensors"
    assert (
        main(
            [
                "lora",
                "convert",
                "--src_path",
                str(tmp_path / "k.safetensors"),
                "--dst_path",
                str(out),
                "--dst",
                "diffusers",
            ]
        )
        == 0
    )
    pipe = FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=model,
    )
    pipe.load_lora_weights(str(out))
    patched = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert len(patched) == sum(k.endswith("lora_A.weight") for k in load_file(out))  # the in_dims layers too
    apply_lora(dit, load_lora(tmp_path / "k.safetensors")[1])
    x = inputs()
    torch.testing.assert_close(run_diffusers(model, x), run_fluxpipe(dit, x), rtol=1e-4, atol=1e-5)
