"""Fused backward pass, blockwise fused optimizers and stochastic rounding, against transformers' Adafactor,
plain torch optimizers and hand-computed bf16 neighbours."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.optimization import Adafactor

from fluxpipe.training.fused_optim import (
    BlockwiseFusedOptimizers,
    FusedBackward,
    adafactor_step_param,
    block_key,
    check_fused_options,
    copy_stochastic_,
    enable_fused_backward,
)

# 1 + 0.3125 * 2^-7 lies between the bf16 neighbours 1 and 1 + 2^-7 (bf16 keeps 7 mantissa bits)
BETWEEN = 1.0 + 2**-9 + 2**-11
LOW, HIGH = 1.0, 1.0 + 2**-7
RELATIVE: dict = {}  # transformers' defaults: relative_step, scale_parameter
FIXED = {"lr": 1e-3, "relative_step": False, "scale_parameter": False, "warmup_init": False}


def test_stochastic_rounding_copies_representable_values_exactly() -> None:
    exact = torch.tensor([0.0, 1.0, -2.5, 3.140625, 1e-3, -65280.0, float("inf")]).bfloat16().float()
    target = torch.empty(exact.shape, dtype=torch.bfloat16)
    for seed in range(20):
        copy_stochastic_(target, exact, torch.Generator().manual_seed(seed))
        assert torch.equal(target.float(), exact)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_stochastic_rounding_is_unbiased_between_the_two_neighbours(sign: float) -> None:
    source = torch.full((200_000,), sign * BETWEEN)
    target = torch.empty(source.shape, dtype=torch.bfloat16)
    copy_stochastic_(target, source, torch.Generator().manual_seed(0))
    values = target.double()
    assert set(values.unique().tolist()) == {sign * LOW, sign * HIGH}
    # round-to-nearest would give 1.0 for all (bias 2.4e-3); the standard error of the mean here is 8e-6
    assert abs(values.mean().item() - sign * BETWEEN) < 5e-5
    assert abs((values == sign * HIGH).double().mean().item() - 0.3125) < 0.005


def test_stochastic_rounding_is_deterministic_with_a_seeded_generator() -> None:
    source = torch.full((1000,), BETWEEN)
    first, second = (torch.empty(1000, dtype=torch.bfloat16) for _ in range(2))
    copy_stochastic_(first, source, torch.Generator().manual_seed(7))
    copy_stochastic_(second, source, torch.Generator().manual_seed(7))
    assert torch.equal(first, second)
    copy_stochastic_(second, source, torch.Generator().manual_seed(8))
    assert not torch.equal(first, second)
    with pytest.raises(ValueError, match="float32 into bfloat16"):
        copy_stochastic_(torch.empty(3), torch.zeros(3))


def two_params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(5, 3, generator=g)), nn.Parameter(torch.randn(4, generator=g))]


@pytest.mark.parametrize(
    "kwargs",
    [
        RELATIVE,
        FIXED,
        {**FIXED, "beta1": 0.9, "weight_decay": 0.01},
        {"warmup_init": True, "clip_threshold": 0.5, "decay_rate": -0.5},
    ],
    ids=["relative", "fixed_lr", "beta1_decay", "warmup_init"],
)
def test_step_param_matches_transformers_adafactor(kwargs: dict) -> None:
    ours, theirs = two_params(), two_params()
    ours_opt, theirs_opt = Adafactor(ours, **kwargs), Adafactor(theirs, **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        for a, b in zip(ours, theirs, strict=True):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        theirs_opt.step()
        for p in ours:
            adafactor_step_param(ours_opt, p, ours_opt.param_groups[0])
    start = two_params()
    for a, b, s in zip(ours, theirs, start, strict=True):
        assert not torch.equal(b, s)  # the parameters moved
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
        assert ours_opt.state[a]["step"] == 4
    assert set(ours_opt.state[ours[0]]) == set(theirs_opt.state[theirs[0]])  # factored moments for the 2-D one
    assert "exp_avg_sq_row" in ours_opt.state[ours[0]] and "exp_avg_sq" in ours_opt.state[ours[1]]


def test_bf16_step_keeps_updates_below_half_a_bf16_step_on_average() -> None:
    param = nn.Parameter(torch.ones(64, 64, dtype=torch.bfloat16))
    param.grad = torch.ones(64, 64, dtype=torch.bfloat16)
    opt = Adafactor([param], lr=1e-4, relative_step=False, scale_parameter=False)
    torch.manual_seed(0)
    adafactor_step_param(opt, param, opt.param_groups[0])
    # fp32 result: 1 - 1e-4 (the clipped update has RMS 1); bf16 neighbours below 1 are 2^-8 apart
    values = param.detach().double()
    assert set(values.unique().tolist()) == {1.0 - 2**-8, 1.0}
    assert abs(values.mean().item() - (1 - 1e-4)) < 3e-5  # round-to-nearest would leave it all at 1.0
    rounded = nn.Parameter(torch.ones(64, 64, dtype=torch.bfloat16))
    rounded.grad = param.grad.clone()
    Adafactor([rounded], lr=1e-4, relative_step=False, scale_parameter=False).step()
    assert torch.all(rounded == 1.0)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def batches(n: int, seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 4, generator=g), torch.randn(6, 2, generator=g)) for _ in range(n)]


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y) * 100  # large gradients, so clipping bites


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_fused_backward_matches_a_normal_adafactor_step(max_grad_norm: float | None) -> None:
    fused, plain = mlp(), mlp()
    fused_opt, plain_opt = Adafactor(fused.parameters(), **FIXED), Adafactor(plain.parameters(), **FIXED)
    hooks = enable_fused_backward(fused_opt, max_grad_norm)
    for x, y in batches(3):
        loss_of(fused, x, y).backward()
        assert all(p.grad is None for p in fused.parameters())
        loss_of(plain, x, y).backward()
        if max_grad_norm is not None:  # the reference clips each tensor on its own
            for p in plain.parameters():
                nn.utils.clip_grad_norm_([p], max_grad_norm)
        plain_opt.step()
        plain_opt.zero_grad()
    for a, b, start in zip(fused.parameters(), plain.parameters(), mlp().parameters(), strict=True):
        assert not torch.equal(b, start)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    hooks.remove()
    loss_of(fused, *batches(1)[0]).backward()
    assert all(p.grad is not None for p in fused.parameters())  # hooks gone: gradients stay


def test_fused_backward_refuses_other_optimizers_and_double_hooks() -> None:
    model = mlp()
    with pytest.raises(ValueError, match="--fused_backward_pass works with Adafactor only"):
        FusedBackward(torch.optim.AdamW(model.parameters()), None)
    fused = FusedBackward(Adafactor(model.parameters()), 1.0)
    with pytest.raises(ValueError, match="cannot be combined"):
        BlockwiseFusedOptimizers(model, lambda ps: torch.optim.AdamW(ps))
    fused.remove()
    BlockwiseFusedOptimizers(model, lambda ps: torch.optim.AdamW(ps)).remove()
    with pytest.raises(ValueError, match="cannot be combined"):
        check_fused_options(True, True, "Adafactor")
    with pytest.raises(ValueError, match="Adafactor only"):
        check_fused_options(True, False, "AdamW")
    check_fused_options(False, True, "AdamW")


class Block(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.randn(n, n) * 0.5)
        self.b = nn.Parameter(torch.randn(n) * 0.1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h @ self.x + self.b)


class TinyDiT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.img_in = nn.Linear(4, 6)
        self.double_blocks = nn.ModuleList([Block(6), Block(6)])
        self.single_blocks = nn.ModuleList([Block(6)])
        self.frozen = nn.Parameter(torch.ones(6), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.img_in(x)
        for block in [*self.double_blocks, *self.single_blocks]:
            h = block(h)
        return (h * self.frozen)[:, :2]


def adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def test_block_keys_and_groups() -> None:
    assert block_key("double_blocks.12.img_attn.qkv.weight") == ("double", 12)
    assert block_key("single_blocks.3.linear1.bias") == ("single", 3)
    assert block_key("img_in.weight") == block_key("double_blocks_extra.0.w") == "other"
    blockwise = BlockwiseFusedOptimizers(TinyDiT(), adamw)
    assert blockwise.names == {
        "other": ["img_in.weight", "img_in.bias"],
        ("double", 0): ["double_blocks.0.x", "double_blocks.0.b"],
        ("double", 1): ["double_blocks.1.x", "double_blocks.1.b"],
        ("single", 0): ["single_blocks.0.x", "single_blocks.0.b"],
    }
    assert set(blockwise.state_dict()) == {"other", "double.0", "double.1", "single.0"}


def train_blockwise(model: TinyDiT, blockwise: BlockwiseFusedOptimizers, data: list) -> None:
    for x, y in data:
        loss_of(model, x, y).backward()
        assert all(p.grad is None for p in model.parameters())


def test_blockwise_adamw_equals_one_adamw_over_all_parameters() -> None:
    blocked, plain = TinyDiT(), TinyDiT()
    blockwise = BlockwiseFusedOptimizers(blocked, adamw)
    train_blockwise(blocked, blockwise, batches(3))
    opt = adamw([p for p in plain.parameters() if p.requires_grad])
    for x, y in batches(3):
        loss_of(plain, x, y).backward()
        opt.step()
        opt.zero_grad()
    for (name, a), b, start in zip(blocked.named_parameters(), plain.parameters(), TinyDiT().parameters(), strict=True):
        assert name == "frozen" or not torch.equal(b, start)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_blockwise_clipping_is_per_block() -> None:
    clipped = TinyDiT()
    blockwise = BlockwiseFusedOptimizers(clipped, lambda ps: torch.optim.SGD(ps, lr=1.0), max_grad_norm=0.01)
    before = [p.detach().clone() for p in clipped.parameters()]
    train_blockwise(clipped, blockwise, batches(1))
    moved = dict(
        zip(
            [n for n, _ in clipped.named_parameters()],
            [(p.detach() - b) for p, b in zip(clipped.parameters(), before, strict=True)],
            strict=True,
        )
    )
    for names in blockwise.names.values():  # SGD with lr 1: each block moved by its clipped gradient, norm 0.01
        norm = torch.linalg.vector_norm(torch.cat([moved[n].flatten() for n in names]))
        assert abs(norm.item() - 0.01) < 1e-6


def test_blockwise_state_dict_round_trip_resumes_exactly() -> None:
    data = batches(4)
    straight = TinyDiT()
    train_blockwise(straight, BlockwiseFusedOptimizers(straight, adamw), data)
    first = TinyDiT()
    first_opts = BlockwiseFusedOptimizers(first, adamw)
    train_blockwise(first, first_opts, data[:2])
    saved_weights, saved_state = copy.deepcopy(first.state_dict()), copy.deepcopy(first_opts.state_dict())
    resumed = TinyDiT()
    resumed.load_state_dict(saved_weights)
    resumed_opts = BlockwiseFusedOptimizers(resumed, adamw)
    resumed_opts.load_state_dict(saved_state)
    train_blockwise(resumed, resumed_opts, data[2:])
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="groups"):
        resumed_opts.load_state_dict({"other": saved_state["other"]})
