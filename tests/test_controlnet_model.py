"""The FLUX.1 ControlNet (sd-scripts ``ControlNetFlux`` layout, spec §7.2) and its injection into ``Flux``."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from fluxpipe.errors import CheckpointError
from fluxpipe.models import Flux
from fluxpipe.models.controlnet import ControlNetFlux, controlnet_key_shapes, load_controlnet_state
from fluxpipe.models.flux import PRESETS, FluxParams, tiny
from fluxpipe.models.layers import timestep_embedding

# spec §7.2 / sd-scripts ControlNetFlux, written out by hand for FLUX.1-dev widths (C = 3072)
CONTROLNET_ONLY_SHAPES = {
    "pos_embed_input.weight": (3072, 64),
    "pos_embed_input.bias": (3072,),
    "controlnet_blocks.0.weight": (3072, 3072),
    "controlnet_blocks.0.bias": (3072,),
    "controlnet_blocks.1.weight": (3072, 3072),
    "controlnet_blocks.1.bias": (3072,),
    "input_hint_block.0.weight": (16, 3, 3, 3),
    "input_hint_block.0.bias": (16,),
    **{f"input_hint_block.{i}.weight": (16, 16, 3, 3) for i in (2, 4, 6, 8, 10, 12, 14)},
    **{f"input_hint_block.{i}.bias": (16,) for i in (2, 4, 6, 8, 10, 12, 14)},
}
SHARED_PREFIXES = (
    "img_in.",
    "time_in.",
    "vector_in.",
    "guidance_in.",
    "txt_in.",
    "double_blocks.0.",
    "double_blocks.1.",
)
# img_in 2 + time_in 4 + vector_in 4 + guidance_in 4 + txt_in 2 + 2 x 24 double-block keys + 20 ControlNet-only keys
DEV_KEY_COUNT = 86
ZERO_INIT = ("input_hint_block.14.", "controlnet_blocks.")
# the last ControlNet block's text-stream output is never used (as in sd-scripts): no gradient reaches these
UNUSED = {f"double_blocks.1.{m}.{w}" for m in ("txt_attn.proj", "txt_mlp.0", "txt_mlp.2") for w in ("weight", "bias")}


def flux_shapes(params: FluxParams) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Flux(params)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_dev_layout_matches_the_hand_table_and_flux() -> None:
    shapes = controlnet_key_shapes(PRESETS["dev"])
    own = {k: v for k, v in shapes.items() if not k.startswith(SHARED_PREFIXES)}
    assert own == CONTROLNET_ONLY_SHAPES
    base = flux_shapes(PRESETS["dev"])
    shared_base = {k: v for k, v in base.items() if k.startswith(SHARED_PREFIXES)}
    assert {k: v for k, v in shapes.items() if k.startswith(SHARED_PREFIXES)} == shared_base
    assert len(shared_base) == DEV_KEY_COUNT - len(CONTROLNET_ONLY_SHAPES)
    assert len(shapes) == DEV_KEY_COUNT


def test_schnell_layout_has_no_guidance_embedding() -> None:
    shapes = controlnet_key_shapes(PRESETS["schnell"])
    assert not any(k.startswith("guidance_in") for k in shapes)
    assert len(shapes) == DEV_KEY_COUNT - 4
    assert controlnet_key_shapes(PRESETS["dev"]).keys() - shapes.keys() == {
        "guidance_in.in_layer.weight",
        "guidance_in.in_layer.bias",
        "guidance_in.out_layer.weight",
        "guidance_in.out_layer.bias",
    }


def test_hint_block_strides_and_downscale() -> None:
    hint = ControlNetFlux(tiny()).input_hint_block
    convs = {i: m for i, m in enumerate(hint) if isinstance(m, torch.nn.Conv2d)}
    assert sorted(convs) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert all(isinstance(hint[i], torch.nn.SiLU) for i in range(1, 15, 2))
    assert {i: c.stride for i, c in convs.items()} == {i: (2, 2) if i in (4, 8, 12) else (1, 1) for i in convs}
    assert all(c.padding == (1, 1) for c in convs.values())
    assert hint(torch.randn(2, 3, 64, 64)).shape == (2, 16, 8, 8)


def inputs(batch: int = 2, grid: int = 4) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    ids = torch.stack((torch.zeros_like(rows), rows, cols), dim=-1).reshape(1, -1, 3).float().repeat(batch, 1, 1)
    return {
        "img": torch.randn(batch, grid * grid, 64, generator=g),
        "img_ids": ids,
        "txt": torch.randn(batch, 5, 32, generator=g),
        "txt_ids": torch.zeros(batch, 5, 3),
        "timesteps": torch.tensor([0.3, 0.8])[:batch],
        "y": torch.randn(batch, 32, generator=g),
        "guidance": torch.tensor([1.0, 3.5])[:batch],
    }


def hint_image(seed: int, batch: int = 2, size: int = 64) -> Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def models() -> tuple[Flux, ControlNetFlux]:
    torch.manual_seed(0)
    return Flux(tiny()), ControlNetFlux(tiny())


def perturb_zero_init(cn: ControlNetFlux) -> None:
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(ZERO_INIT):
                p.copy_(torch.randn_like(p) * 0.1)


def test_fresh_controlnet_is_zero_and_leaves_the_base_unchanged() -> None:
    base, cn = models()
    assert all(not p.any() for n, p in cn.named_parameters() if n.startswith(ZERO_INIT))
    assert any(p.any() for n, p in cn.named_parameters() if n.startswith("input_hint_block.12."))
    x = inputs()
    with torch.no_grad():
        residuals = cn(controlnet_cond=hint_image(0), **x)
        assert len(residuals) == 2 and all(r.shape == (2, 16, 64) for r in residuals)
        assert all(not r.any() for r in residuals)
        assert torch.equal(base(**x, controlnet_residuals=residuals), base(**x))


def test_trained_controlnet_changes_the_output_by_its_hint() -> None:
    base, cn = models()
    perturb_zero_init(cn)
    x = inputs()
    with torch.no_grad():
        res_a = cn(controlnet_cond=hint_image(0), **x)
        res_b = cn(controlnet_cond=hint_image(1), **x)
        assert all(r.abs().max() > 0 for r in res_a)
        plain = base(**x)
        out_a = base(**x, controlnet_residuals=res_a)
        out_b = base(**x, controlnet_residuals=res_b)
    assert not torch.allclose(out_a, plain)
    assert not torch.allclose(out_a, out_b)


def manual_flux(base: Flux, x: dict[str, Tensor], residuals: list[Tensor]) -> Tensor:
    """Flux.forward written out with the sd-scripts rule: residual i % n added after double block i only."""
    img = base.img_in(x["img"])
    vec = base.time_in(timestep_embedding(x["timesteps"], 256)) + base.guidance_in(
        timestep_embedding(x["guidance"], 256)
    )
    vec = vec + base.vector_in(x["y"])
    txt = base.txt_in(x["txt"])
    pe = base.pe_embedder(torch.cat((x["txt_ids"], x["img_ids"]), dim=1))
    for i, block in enumerate(base.double_blocks):
        img, txt = block(img, txt, vec, pe)
        img = img + residuals[i % len(residuals)]
    h = torch.cat((txt, img), dim=1)
    for block in base.single_blocks:
        h = block(h, vec, pe)
    return base.final_layer(h[:, txt.shape[1] :], vec)


@pytest.mark.parametrize("n_residuals", [1, 2, 3])
def test_flux_injects_residual_i_mod_n_after_each_double_block(n_residuals: int) -> None:
    base, _ = models()
    x = inputs()
    g = torch.Generator().manual_seed(5)
    residuals = [torch.randn(2, 16, 64, generator=g) for _ in range(n_residuals)]
    with torch.no_grad():
        got = base(**x, controlnet_residuals=residuals)
        torch.testing.assert_close(got, manual_flux(base, x, residuals), rtol=0, atol=1e-6)
        assert not torch.allclose(got, base(**x))


def test_gradients_reach_every_controlnet_parameter() -> None:
    base, cn = models()
    base.requires_grad_(False)
    x = inputs()
    base(**x, controlnet_residuals=cn(controlnet_cond=hint_image(0), **x)).square().mean().backward()
    grads = {n: p.grad for n, p in cn.named_parameters()}
    assert {n for n, g in grads.items() if g is None} == UNUSED
    assert all(grads[n].abs().sum() > 0 for n in grads if n.startswith("controlnet_blocks."))
    cn.zero_grad(set_to_none=True)
    perturb_zero_init(cn)
    base(**x, controlnet_residuals=cn(controlnet_cond=hint_image(0), **x)).square().mean().backward()
    # ... and the last block's text queries only shape its unused text output: a zero gradient
    dead = UNUSED | {"double_blocks.1.txt_attn.norm.query_norm.scale"}
    assert {n for n, p in cn.named_parameters() if p.grad is None or not p.grad.any()} == dead


def test_gradient_checkpointing_gives_the_same_residuals_and_grads() -> None:
    _, cn = models()
    perturb_zero_init(cn)
    cn.train()
    x = {**inputs(), "txt_attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    with torch.no_grad():
        unmasked = cn(controlnet_cond=hint_image(0), **{k: v for k, v in x.items() if k != "txt_attention_mask"})

    def run(checkpointing: bool) -> tuple[list[Tensor], list[Tensor]]:
        cn.zero_grad(set_to_none=True)
        cn.gradient_checkpointing = checkpointing
        res = cn(controlnet_cond=hint_image(0), **x)
        sum(r.square().mean() for r in res).backward()
        return [r.detach() for r in res], [p.grad.clone() for n, p in cn.named_parameters() if n not in UNUSED]

    plain, checkpointed = run(False), run(True)
    assert not torch.allclose(plain[0][0][0], unmasked[0][0])  # the text mask reaches the blocks
    torch.testing.assert_close(plain[0][0][1], unmasked[0][1])  # ... and only the masked sample
    for a, b in zip(plain[0] + plain[1], checkpointed[0] + checkpointed[1], strict=True):
        torch.testing.assert_close(a, b)


def test_strict_loading_round_trips_and_rejects_bad_state() -> None:
    _, cn = models()
    perturb_zero_init(cn)
    state = {k: v.clone() for k, v in cn.state_dict().items()}
    fresh = ControlNetFlux(tiny())
    load_controlnet_state(fresh, state)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    missing = {k: v for k, v in state.items() if k != "pos_embed_input.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys: pos_embed_input\.bias"):
        load_controlnet_state(fresh, missing)
    wrong = {**state, "input_hint_block.14.weight": torch.zeros(16, 16, 1, 1)}
    with pytest.raises(CheckpointError, match=r"wrong shapes: input_hint_block\.14\.weight"):
        load_controlnet_state(fresh, wrong)
    extra = {**missing, "controlnet_blocks_for_single.0.weight": torch.zeros(64, 64)}
    with pytest.raises(CheckpointError, match="missing keys.*unexpected keys: controlnet_blocks_for_single"):
        load_controlnet_state(fresh, extra)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())  # a failed load changes nothing


def test_rejects_a_hint_of_the_wrong_size() -> None:
    _, cn = models()
    with pytest.raises(ValueError, match="16 x the packed latent grid"):
        cn(controlnet_cond=hint_image(0, size=32), **inputs())
