"""--blocks_to_swap (streamed block weights) and --cpu_offload_checkpointing: the schedule, the split, the errors,
and equality with the plain model (CPU here; the same checks on CUDA are marked gpu)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fluxpipe.lora.network import FluxLoRANetwork, LoraSpec
from fluxpipe.memory.block_swap import BlockSwapper, max_blocks_to_swap, prefetch_target, swap_plan
from fluxpipe.models import Flux
from fluxpipe.models.flux import PRESETS, tiny


def test_split_as_the_reference() -> None:
    # N=18 (the seed's command): 9 double + 18 single; N=28: 14 double + 28 single; N=35: 17 + 36 (the maximum)
    dev = PRESETS["dev"]
    for n, nd, ns in ((18, 9, 18), (28, 14, 28), (35, 17, 36), (1, 0, 2), (0, 0, 0)):
        plan = swap_plan(n, dev.depth, dev.depth_single_blocks)
        assert (len(plan.double), len(plan.single)) == (nd, ns)
        assert plan.double == tuple(range(19 - nd, 19)) and plan.single == tuple(range(38 - ns, 38))
    assert max_blocks_to_swap(19, 38) == 35
    assert max_blocks_to_swap(2, 2) == 0  # the demo model: nothing can be swapped
    with pytest.raises(ValueError, match="can swap 0 to 35"):
        swap_plan(36, 19, 38)
    with pytest.raises(ValueError, match="can swap 0 to 35"):
        swap_plan(-1, 19, 38)


def test_prefetch_order_forward_backward_and_wrap() -> None:
    order = (("double", 2), ("double", 3), ("single", 4), ("single", 5))
    assert [prefetch_target(order, k, False, True) for k in order] == [order[1], order[2], order[3], order[3]]
    assert prefetch_target(order, order[3], False, False) == order[0]  # sampling: the next call starts at the top
    assert [prefetch_target(order, k, True, True) for k in order] == [order[0], order[0], order[1], order[2]]


def deep_tiny() -> Flux:
    torch.manual_seed(0)
    return Flux(replace(tiny(), depth=4, depth_single_blocks=6)).requires_grad_(False)


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "img": torch.randn(2, 6, 64, generator=g),
        "img_ids": torch.rand(2, 6, 3, generator=g) * 4,
        "txt": torch.randn(2, 4, 32, generator=g),
        "txt_ids": torch.zeros(2, 4, 3),
        "timesteps": torch.tensor([0.3, 0.7]),
        "y": torch.randn(2, 32, generator=g),
        "guidance": torch.tensor([1.0, 3.5]),
    }


def with_lora(model: Flux, dropout: float | None = None) -> FluxLoRANetwork:
    torch.manual_seed(5)  # the lora_down initialisation
    net = FluxLoRANetwork(model, LoraSpec(network_dim=4, network_alpha=2, dropout=dropout))
    net.apply_to()
    g = torch.Generator().manual_seed(3)
    for m in net.loras:
        m.lora_up.weight.data = torch.randn(m.lora_up.weight.shape, generator=g) * 0.1
    return net


def loss_and_grads(model: Flux, net: FluxLoRANetwork, device: str = "cpu") -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(7)  # the LoRA dropout draws
    out = model(**{k: v.to(device) for k, v in inputs().items()})
    out.float().square().mean().backward()
    grads = [p.grad.detach().float().cpu().clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    return out.detach().float().cpu(), grads


def swapped_pair(blocks_to_swap: int, device: str, dropout: float | None = None):  # noqa: ANN201
    """Two equal models with equal LoRAs (made on the CPU, so that both draw the same initial weights); the second
    streams its last blocks."""
    plain, streamed = deep_tiny(), deep_tiny()
    net_a, net_b = with_lora(plain, dropout), with_lora(streamed, dropout)
    plain.to(device)
    net_a.to(device)
    swapper = BlockSwapper(streamed, blocks_to_swap, device)
    swapper.place(streamed)
    streamed.block_swapper = swapper
    return plain, net_a, streamed, net_b.to(device), swapper


@pytest.mark.parametrize("checkpointing", [False, True])
def test_swapped_training_step_equals_the_plain_one(checkpointing: bool) -> None:
    plain, net_a, streamed, net_b, swapper = swapped_pair(4, "cpu", dropout=0.1)
    for m in (plain, streamed):
        m.train().gradient_checkpointing = checkpointing
    swapper.trace = []
    out_a, grads_a = loss_and_grads(plain, net_a)
    out_b, grads_b = loss_and_grads(streamed, net_b)
    assert torch.equal(out_a, out_b)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads_a, grads_b, strict=True))
    assert any(g.abs().sum() > 0 for g in grads_b)
    # 2 double + 4 single blocks swapped; each used in the forward pass and again when recomputed in the backward
    order = swapper.order
    assert order == (("double", 2), ("double", 3), ("single", 2), ("single", 3), ("single", 4), ("single", 5))
    uses = [k for what, k in swapper.trace if what == "use"]
    assert uses == list(order) + list(reversed(order))
    fetches = [k for what, k in swapper.trace if what == "fetch"]
    assert fetches == list(order) + list(reversed(order))[1:]  # the last block is kept for the backward pass
    assert swapper.plan.double == (2, 3) and swapper.plan.single == (2, 3, 4, 5)


def test_swapped_weights_stay_on_the_host_and_eval_wraps_round() -> None:
    plain, _, streamed, _, swapper = swapped_pair(4, "cpu")
    swapper.trace = []
    with torch.no_grad():
        a = plain.eval()(**inputs())
        b = streamed.eval()(**inputs())
        c = streamed(**inputs())
    assert torch.equal(a, b) and torch.equal(b, c)
    fetches = [k for what, k in swapper.trace if what == "fetch"]
    # the second call starts with the first block already fetched at the end of the first call
    assert fetches == list(swapper.order) * 2 + [swapper.order[0]]  # each call ends fetching the first block
    assert swapper.host_bytes() == sum(p.numel() * 4 for w in swapper.host.values() for p in w.values()) > 0


def test_offloaded_checkpointing_equals_plain_training() -> None:
    torch.manual_seed(0)
    plain, offloaded = deep_tiny(), deep_tiny()
    net_a, net_b = with_lora(plain, dropout=0.2), with_lora(offloaded, dropout=0.2)
    plain.train()
    offloaded.train().gradient_checkpointing = True
    offloaded.cpu_offload_checkpointing = True
    out_a, grads_a = loss_and_grads(plain, net_a)
    out_b, grads_b = loss_and_grads(offloaded, net_b)
    assert torch.equal(out_a, out_b)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads_a, grads_b, strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("blocks_to_swap", [1, 4])
def test_gpu_swapped_training_equals_the_plain_one(blocks_to_swap: int) -> None:
    plain, net_a, streamed, net_b, swapper = swapped_pair(blocks_to_swap, "cuda", dropout=0.1)
    assert all(p.device.type == "cpu" and p.is_pinned() for w in swapper.host.values() for p in w.values())
    for m in (plain, streamed):
        m.train().gradient_checkpointing = True
    for _ in range(2):  # the second step starts from the weights kept at the end of the first
        out_a, grads_a = loss_and_grads(plain, net_a, "cuda")
        out_b, grads_b = loss_and_grads(streamed, net_b, "cuda")
        assert torch.equal(out_a, out_b)
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(grads_a, grads_b, strict=True))
    net_a.eval()
    net_b.eval()  # the LoRA dropout off too: no random draws
    with torch.no_grad():
        assert torch.equal(
            plain.eval()(**{k: v.cuda() for k, v in inputs().items()}),
            streamed.eval()(**{k: v.cuda() for k, v in inputs().items()}),
        )


@pytest.mark.gpu
def test_gpu_offloaded_checkpointing_equals_plain_training() -> None:
    plain, offloaded = deep_tiny(), deep_tiny()
    net_a, net_b = with_lora(plain, dropout=0.2), with_lora(offloaded, dropout=0.2)
    for module in (plain, offloaded, net_a, net_b):
        module.cuda()
    plain.train()
    offloaded.train().gradient_checkpointing = True
    offloaded.cpu_offload_checkpointing = True
    out_a, grads_a = loss_and_grads(plain, net_a, "cuda")
    out_b, grads_b = loss_and_grads(offloaded, net_b, "cuda")
    assert torch.equal(out_a, out_b)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(grads_a, grads_b, strict=True))


def full_grads(model: Flux, device: str = "cpu") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = model(**{k: v.to(device) for k, v in inputs().items()})
    out.float().square().mean().backward()
    grads = {n: p.grad.detach().float().cpu().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.detach().float().cpu(), grads


def trainable_pair(device: str) -> tuple[Flux, Flux, BlockSwapper]:
    plain, streamed = deep_tiny().requires_grad_(True), deep_tiny().requires_grad_(True)
    plain.to(device)
    swapper = BlockSwapper(streamed, 4, device)
    swapper.place(streamed)
    streamed.block_swapper = swapper
    for m in (plain, streamed):
        m.train().gradient_checkpointing = True
    return plain, streamed, swapper


def test_trainable_swapped_weights_get_their_gradients_on_the_host() -> None:
    plain, streamed, swapper = trainable_pair("cpu")
    out_a, grads_a = full_grads(plain)
    out_b, grads_b = full_grads(streamed)
    assert torch.equal(out_a, out_b) and grads_a.keys() == grads_b.keys()
    assert all(torch.allclose(grads_a[n], grads_b[n], rtol=1e-5, atol=1e-7) for n in grads_a)
    swapped = dict(streamed.named_parameters())["single_blocks.5.linear1.weight"]
    assert swapped.device.type == "cpu" and grads_b["single_blocks.5.linear1.weight"].abs().sum() > 0
    with torch.no_grad():  # an optimizer step on the host weight; the next forward must see it
        swapped.add_(1.0)
        dict(plain.named_parameters())["single_blocks.5.linear1.weight"].add_(1.0)
    swapper.invalidate()
    assert torch.equal(full_grads(plain)[0], full_grads(streamed)[0])


@pytest.mark.gpu
def test_gpu_trainable_swapped_weights_get_their_gradients_on_the_host() -> None:
    plain, streamed, swapper = trainable_pair("cuda")
    for _ in range(2):
        out_a, grads_a = full_grads(plain, "cuda")
        out_b, grads_b = full_grads(streamed, "cuda")
        assert torch.equal(out_a, out_b)
        assert all(torch.allclose(grads_a[n], grads_b[n], rtol=1e-5, atol=1e-6) for n in grads_a)
        with torch.no_grad():  # one SGD step on both (the swapped weights are updated in host memory)
            for (name, a), (_, b) in zip(plain.named_parameters(), streamed.named_parameters(), strict=True):
                a.sub_(0.01 * grads_a[name].to(a.device))
                b.sub_(0.01 * grads_a[name].to(b.device))
        swapper.invalidate()
    assert dict(streamed.named_parameters())["single_blocks.5.linear1.weight"].is_pinned()
