"""--fp8_base: fp8 storage of the frozen DiT's Linear weights, upcast per matmul."""

from __future__ import annotations

import pytest
import torch

from fluxpipe.memory.fp8 import FP8, store_linears_fp8
from fluxpipe.models import Flux
from fluxpipe.models.flux import tiny


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "img": torch.randn(2, 6, 64, generator=g),
        "img_ids": torch.zeros(2, 6, 3),
        "txt": torch.randn(2, 4, 32, generator=g),
        "txt_ids": torch.zeros(2, 4, 3),
        "timesteps": torch.tensor([0.3, 0.7]),
        "y": torch.randn(2, 32, generator=g),
        "guidance": torch.tensor([1.0, 1.0]),
    }


def test_fp8_model_equals_the_model_with_fp8_rounded_weights() -> None:
    torch.manual_seed(0)
    model = Flux(tiny()).requires_grad_(False).eval()
    rounded = Flux(tiny()).requires_grad_(False).eval()
    rounded.load_state_dict(model.state_dict())
    for m in rounded.modules():  # the reference result: weights rounded through fp8, kept in fp32
        if isinstance(m, torch.nn.Linear):
            m.weight.data = m.weight.data.to(FP8).float()
    n = store_linears_fp8(model)
    assert n == sum(isinstance(m, torch.nn.Linear) for m in model.modules()) and model.img_in.weight.dtype == FP8
    with torch.no_grad():
        assert torch.equal(model(**inputs()), rounded(**inputs()))
        assert not torch.equal(model(**inputs()), Flux(tiny()).eval()(**inputs()))  # it did change something


def test_lora_wraps_the_upcasting_forward_and_trains() -> None:
    from fluxpipe.lora.network import FluxLoRANetwork, LoraSpec

    torch.manual_seed(0)
    model = Flux(tiny()).requires_grad_(False)
    store_linears_fp8(model)
    network = FluxLoRANetwork(model, LoraSpec(network_dim=4, network_alpha=4))
    network.apply_to()
    for m in network.loras:  # non-zero up weights so that the LoRA contributes
        torch.nn.init.normal_(m.lora_up.weight, std=0.1)
    out = model(**inputs())
    out.square().mean().backward()
    grads = [m.lora_up.weight.grad for m in network.loras]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.img_in.weight.grad is None and model.img_in.weight.dtype == FP8


def test_trainable_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="frozen"):
        store_linears_fp8(torch.nn.Linear(2, 2))
