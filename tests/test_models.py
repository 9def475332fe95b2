"""FLUX.1 model presets and parameter inference against the key/shape table of flux-training-spec.md §1.3."""

from __future__ import annotations

import pytest
import torch

from fluxpipe.models import AutoEncoder, Flux, FluxParams
from fluxpipe.models.autoencoder import FLUX1_AE, infer_ae_params, tiny_ae
from fluxpipe.models.flux import PRESETS, derived_axes_dim, flux_size_class, infer_flux_params, tiny

# spec §1.3, written out by hand (C = 3072, MLP 12288, 64 in, 4096 T5, 768 CLIP)
SPEC_SHAPES = {
    "img_in.weight": (3072, 64),
    "img_in.bias": (3072,),
    "txt_in.weight": (3072, 4096),
    "txt_in.bias": (3072,),
    "time_in.in_layer.weight": (3072, 256),
    "time_in.out_layer.weight": (3072, 3072),
    "vector_in.in_layer.weight": (3072, 768),
    "vector_in.out_layer.bias": (3072,),
    "guidance_in.in_layer.weight": (3072, 256),
    "guidance_in.out_layer.weight": (3072, 3072),
    "double_blocks.18.img_mod.lin.weight": (18432, 3072),
    "double_blocks.0.txt_mod.lin.bias": (18432,),
    "double_blocks.0.img_attn.qkv.weight": (9216, 3072),
    "double_blocks.0.txt_attn.qkv.bias": (9216,),
    "double_blocks.0.img_attn.norm.query_norm.scale": (128,),
    "double_blocks.0.txt_attn.norm.key_norm.scale": (128,),
    "double_blocks.0.img_attn.proj.weight": (3072, 3072),
    "double_blocks.0.img_mlp.0.weight": (12288, 3072),
    "double_blocks.0.txt_mlp.2.weight": (3072, 12288),
    "double_blocks.0.txt_mlp.2.bias": (3072,),
    "single_blocks.37.linear1.weight": (21504, 3072),
    "single_blocks.0.linear1.bias": (21504,),
    "single_blocks.0.linear2.weight": (3072, 15360),
    "single_blocks.0.norm.query_norm.scale": (128,),
    "single_blocks.0.modulation.lin.weight": (9216, 3072),
    "final_layer.linear.weight": (64, 3072),
    "final_layer.adaLN_modulation.1.weight": (6144, 3072),
    "final_layer.adaLN_modulation.1.bias": (6144,),
}
# hand count: embedders 45,047,808 (with guidance) + final 19,077,184 + 19 x 339,831,296 + 38 x 141,591,808
DEV_PARAMS = 11_901_408_320
GUIDANCE_IN_PARAMS = 3072 * 256 + 3072 + 3072 * 3072 + 3072


def meta_state(params: FluxParams) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Flux(params)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_dev_preset_matches_spec_table_and_parameter_count() -> None:
    shapes = meta_state(PRESETS["dev"])
    for key, shape in SPEC_SHAPES.items():
        assert shapes[key] == shape, key
    assert len([k for k in shapes if k.startswith("double_blocks.")]) == 19 * 24
    assert len([k for k in shapes if k.startswith("single_blocks.")]) == 38 * 8
    assert sum(torch.Size(s).numel() for s in shapes.values()) == DEV_PARAMS


def test_schnell_preset_has_no_guidance_embedding() -> None:
    shapes = meta_state(PRESETS["schnell"])
    assert not any(k.startswith("guidance_in") for k in shapes)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == DEV_PARAMS - GUIDANCE_IN_PARAMS


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_infer_params_round_trips_the_presets(variant: str) -> None:
    params = infer_flux_params(meta_state(PRESETS[variant]))
    assert params == PRESETS[variant]
    assert flux_size_class(params) == "full"


def test_infer_params_counts_pruned_blocks() -> None:
    shapes = {
        k: v
        for k, v in meta_state(PRESETS["dev"]).items()
        if not k.startswith("double_blocks.") or int(k.split(".")[1]) < 8
    }
    params = infer_flux_params(shapes)
    assert (params.depth, params.depth_single_blocks) == (8, 38)
    assert flux_size_class(params) == "pruned"


def test_infer_params_rejects_gaps_in_block_indices() -> None:
    shapes = {k: v for k, v in meta_state(tiny()).items() if not k.startswith("single_blocks.0.")}
    with pytest.raises(ValueError, match="not contiguous"):
        infer_flux_params(shapes)


def test_axes_rule_gives_the_official_split() -> None:
    assert derived_axes_dim(128) == [16, 56, 56]
    assert derived_axes_dim(32) == [4, 14, 14]
    with pytest.raises(ValueError):
        derived_axes_dim(20)


def test_params_check_head_dim_against_axes() -> None:
    with pytest.raises(ValueError, match="axes_dim"):
        FluxParams(**{**tiny().__dict__, "axes_dim": [4, 14, 12]})
    with pytest.raises(ValueError, match="divisible"):
        FluxParams(**{**tiny().__dict__, "num_heads": 3})


def test_dev_model_requires_guidance() -> None:
    model = Flux(tiny(True)).eval()
    img, ids = torch.randn(1, 4, 64), torch.zeros(1, 4, 3)
    with pytest.raises(ValueError, match="guidance"):
        model(
            img=img,
            img_ids=ids,
            txt=torch.randn(1, 3, 32),
            txt_ids=torch.zeros(1, 3, 3),
            timesteps=torch.tensor([0.5]),
            y=torch.randn(1, 32),
        )


def test_full_autoencoder_keys_and_parameter_inference() -> None:
    with torch.device("meta"):
        ae = AutoEncoder(FLUX1_AE)
    shapes = {k: tuple(v.shape) for k, v in ae.state_dict().items()}
    assert shapes["encoder.conv_out.weight"] == (32, 512, 3, 3)
    assert shapes["decoder.conv_in.weight"] == (512, 16, 3, 3)
    assert "encoder.down.1.block.0.nin_shortcut.weight" in shapes
    assert "decoder.up.1.block.0.nin_shortcut.weight" in shapes
    assert "encoder.down.3.downsample.conv.weight" not in shapes and "decoder.up.0.upsample.conv.weight" not in shapes
    assert infer_ae_params(shapes) == FLUX1_AE
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 83_819_683


def test_tiny_autoencoder_downsamples_by_8_and_encode_normalises() -> None:
    torch.manual_seed(0)
    ae = AutoEncoder(tiny_ae()).eval()
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        moments = ae.encoder(x)
        z = ae.encode(x, sample=False)
        assert moments.shape == (1, 32, 4, 6)
        torch.testing.assert_close(z, 0.3611 * (moments[:, :16] - 0.1159))
        assert ae.decode(z).shape == x.shape
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        torch.testing.assert_close(ae.encode(x, generator=g1), ae.encode(x, generator=g2))
