"""apply_lora with kohya/ComfyUI key names, against hand-computed merges."""

from __future__ import annotations

import pytest
import torch

from fluxpipe.errors import CheckpointError
from fluxpipe.lora.files import apply_lora, parse_lora
from fluxpipe.models import Flux
from fluxpipe.models.flux import tiny


def test_merge_by_hand() -> None:
    model = Flux(tiny())
    w0 = model.double_blocks[1].img_attn.proj.weight.detach().clone()
    down = torch.zeros(2, 64)
    up = torch.zeros(64, 2)
    down[0, 3], down[1, 5] = 1.0, 2.0
    up[7, 0], up[9, 1] = 3.0, 4.0
    n = apply_lora(
        model,
        {
            "lora_unet_double_blocks_1_img_attn_proj.lora_down.weight": down,
            "lora_unet_double_blocks_1_img_attn_proj.lora_up.weight": up,
            "lora_unet_double_blocks_1_img_attn_proj.alpha": torch.tensor(1.0),
        },
        multiplier=0.5,
    )
    assert n == 1
    delta = model.double_blocks[1].img_attn.proj.weight - w0
    # scale = alpha / rank = 1/2, multiplier 0.5: delta[7,3] = 0.25 * 3 * 1, delta[9,5] = 0.25 * 4 * 2
    expected = torch.zeros(64, 64)
    expected[7, 3], expected[9, 5] = 0.75, 2.0
    torch.testing.assert_close(delta, expected)


def test_missing_alpha_means_scale_one() -> None:
    pairs = parse_lora({"x.lora_down.weight": torch.zeros(4, 3), "x.lora_up.weight": torch.zeros(5, 4)})
    assert pairs["x"].scale == 1.0


def test_unmatched_module_is_an_error_not_a_skip() -> None:
    with pytest.raises(CheckpointError, match="1 LoRA modules match no layer: lora_unet_double_blocks_9_img_attn_proj"):
        apply_lora(
            Flux(tiny()),
            {
                "lora_unet_double_blocks_9_img_attn_proj.lora_down.weight": torch.zeros(2, 64),
                "lora_unet_double_blocks_9_img_attn_proj.lora_up.weight": torch.zeros(64, 2),
            },
        )


def test_text_encoder_modules_need_their_encoder() -> None:
    sd = {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 64),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(128, 2),
    }
    with pytest.raises(CheckpointError, match=r"pass the text encoder\(s\) for \['lora_te1'\]"):
        apply_lora(Flux(tiny()), sd)


def test_text_encoder_lora_merges_into_clip(demo_dir) -> None:  # noqa: ANN001
    from fluxpipe.io.checkpoints import load_model
    from fluxpipe.tools.demo import FILES

    clip = load_model(demo_dir / FILES["clip_l"], "clip_l", dtype=torch.float32)
    before = clip.encoder.layers[0].mlp.fc1.weight.clone()
    sd = {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(1, 64),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(128, 1),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0),
    }
    apply_lora(Flux(tiny(vec_in_dim=64, context_in_dim=64)), sd, 2.0, clip_l=clip)
    torch.testing.assert_close(clip.encoder.layers[0].mlp.fc1.weight - before, torch.full((128, 64), 2.0))


def test_foreign_layout_is_named() -> None:
    with pytest.raises(CheckpointError, match="not in the kohya/ComfyUI layout"):
        parse_lora({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 2)})
