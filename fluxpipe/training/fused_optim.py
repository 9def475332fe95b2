"""The memory features of the reference full fine-tune: fused backward pass and blockwise fused optimizers.

``copy_stochastic_`` writes an fp32 tensor into a bf16 one with stochastic rounding (unbiased, so updates
smaller than half a bf16 step are not lost under ``--full_bf16``). ``adafactor_step_param`` is one step of
transformers' Adafactor for a single parameter (fp32 maths, bf16 written back stochastically).

``FusedBackward`` (``--fused_backward_pass``, Adafactor only) steps each parameter from a
post-accumulate-grad hook as soon as its gradient is ready and frees the gradient at once, so no full set of
gradients is ever held. ``BlockwiseFusedOptimizers`` (``--blockwise_fused_optimizers``, any optimizer) keeps
one optimizer per FLUX block (``double_blocks.N`` / ``single_blocks.N`` / the rest) and steps a block's
optimizer once all of that block's gradients have arrived. The two cannot be combined (ValueError; the caller
should check with ``check_fused_options`` before building either). Neither works with gradient
accumulation: every backward pass is an optimizer step. Schedulers stay the training loop's business
(``BlockwiseFusedOptimizers.optimizers`` lists the optimizers to schedule).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

_MARK = "_fluxpipe_fused_hook"  # set on a parameter that carries one of the hooks here
GroupKey = tuple[str, int] | str


def check_fused_options(fused_backward_pass: bool, blockwise_fused_optimizers: bool, optimizer_type: str) -> None:
    """The reference's rules: not both; fused backward needs Adafactor."""
    if fused_backward_pass and blockwise_fused_optimizers:
        raise ValueError("--fused_backward_pass and --blockwise_fused_optimizers cannot be combined")
    if fused_backward_pass and optimizer_type.lower() != "adafactor":
        raise ValueError(f"--fused_backward_pass works with Adafactor only, not {optimizer_type}")


def copy_stochastic_(target: Tensor, source: Tensor, generator: torch.Generator | None = None) -> None:
    """Write fp32 ``source`` into bf16 ``target``, rounding up with probability (low 16 bits) / 2^16."""
    if source.dtype != torch.float32 or target.dtype != torch.bfloat16:
        raise ValueError(f"copy_stochastic_ copies float32 into bfloat16, not {source.dtype} into {target.dtype}")
    noise = torch.randint(0, 1 << 16, source.shape, generator=generator, dtype=torch.int32, device=source.device)
    noise.add_(source.contiguous().view(torch.int32))
    noise.bitwise_and_(-65536)  # 0xFFFF0000: keep sign, exponent and the 7 mantissa bits bf16 holds
    target.copy_(noise.view(torch.float32))


def _rms(tensor: Tensor) -> Tensor:
    return tensor.norm(2) / (tensor.numel() ** 0.5)


def _adafactor_lr(group: dict[str, Any], state: dict[str, Any]) -> Any:
    step_size = group["lr"]
    if group["relative_step"]:
        min_step = 1e-6 * state["step"] if group["warmup_init"] else 1e-2
        step_size = min(min_step, 1.0 / math.sqrt(state["step"]))
    scale = max(group["eps"][1], state["RMS"]) if group["scale_parameter"] else 1.0
    return scale * step_size


def _adafactor_state(state: dict[str, Any], grad: Tensor, factored: bool, first_moment: bool) -> None:
    """Create the moments on the first step; move them to the gradient's device and dtype afterwards."""
    shape = grad.shape
    if not state:
        state["step"] = 0
        if first_moment:
            state["exp_avg"] = torch.zeros_like(grad)
        if factored:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1]).to(grad)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:]).to(grad)
        else:
            state["exp_avg_sq"] = torch.zeros_like(grad)
        state["RMS"] = 0
        return
    for key in ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
        if key in state:
            state[key] = state[key].to(grad)


def _scaled_gradient(state: dict[str, Any], grad: Tensor, factored: bool, decay_rate: float, eps: float) -> Tensor:
    """Update the second moments (factored for >= 2-D) and return grad / sqrt(second moment)."""
    beta2t = 1.0 - math.pow(state["step"], decay_rate)
    squared = grad**2 + eps
    if not factored:
        state["exp_avg_sq"].mul_(beta2t).add_(squared, alpha=1.0 - beta2t)
        return state["exp_avg_sq"].rsqrt().mul_(grad)
    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
    row.mul_(beta2t).add_(squared.mean(dim=-1), alpha=1.0 - beta2t)
    col.mul_(beta2t).add_(squared.mean(dim=-2), alpha=1.0 - beta2t)
    r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    c_factor = col.unsqueeze(-2).rsqrt()
    return torch.mul(r_factor, c_factor).mul_(grad)


@torch.no_grad()
def adafactor_step_param(
    optimizer: torch.optim.Optimizer, param: Tensor, group: dict[str, Any], generator: torch.Generator | None = None
) -> None:
    """One transformers-Adafactor step for ``param`` (state in ``optimizer.state[param]``); a parameter
    without a gradient is skipped. bf16 parameters are updated in fp32 and written back by ``copy_stochastic_``
    (fp16 ones by round-to-nearest, as the reference)."""
    if param.grad is None:
        return
    grad = param.grad
    if grad.is_sparse:
        raise RuntimeError("Adafactor does not support sparse gradients.")
    if grad.dtype in (torch.float16, torch.bfloat16):
        grad = grad.float()
    factored, first_moment = grad.dim() >= 2, group["beta1"] is not None
    state = optimizer.state[param]
    _adafactor_state(state, grad, factored, first_moment)
    low_precision = param.dtype in (torch.float16, torch.bfloat16)
    weights = param.float() if low_precision else param
    state["step"] += 1
    state["RMS"] = _rms(weights)
    lr = _adafactor_lr(group, state)
    update = _scaled_gradient(state, grad, factored, group["decay_rate"], group["eps"][0])
    update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
    update.mul_(lr)
    if first_moment:
        update = state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
    if group["weight_decay"] != 0:
        weights.add_(weights, alpha=-group["weight_decay"] * lr)
    weights.add_(-update)
    if param.dtype == torch.bfloat16:
        copy_stochastic_(param, weights, generator)
    elif param.dtype == torch.float16:
        param.copy_(weights)


def _mark(params: Iterable[Tensor], kind: str) -> None:
    params = list(params)
    for p in params:
        if getattr(p, _MARK, None) is not None:
            raise ValueError(
                f"a parameter already has the {getattr(p, _MARK)} hooks: --fused_backward_pass and "
                "--blockwise_fused_optimizers cannot be combined (nor either applied twice)"
            )
    for p in params:
        setattr(p, _MARK, kind)


def _unmark(params: Iterable[Tensor]) -> None:
    for p in params:
        if hasattr(p, _MARK):
            delattr(p, _MARK)


def _clip_enabled(max_grad_norm: float | None) -> bool:
    return max_grad_norm is not None and max_grad_norm != 0.0  # 0 turns clipping off, as in the reference


class FusedBackward:
    """``--fused_backward_pass``: each parameter of ``optimizer`` (a transformers Adafactor) is clipped on its
    own (if ``max_grad_norm``), stepped and has its gradient freed as soon as backward has accumulated it.
    Call the training loop's ``loss.backward()`` only; no ``optimizer.step()`` / ``zero_grad()``."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None) -> None:
        from transformers.optimization import Adafactor

        if not isinstance(optimizer, Adafactor):
            raise ValueError(
                f"--fused_backward_pass works with Adafactor only (transformers.optimization."
                f"Adafactor), not {type(optimizer).__name__}"
            )
        self.optimizer, self.max_grad_norm = optimizer, max_grad_norm
        pairs = [(p, g) for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self._params = [p for p, _ in pairs]
        _mark(self._params, "fused_backward_pass")
        self._handles: list[RemovableHandle] = [p.register_post_accumulate_grad_hook(self._hook(g)) for p, g in pairs]

    def _hook(self, group: dict[str, Any]) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            if param.grad is None:
                return
            if _clip_enabled(self.max_grad_norm):
                nn.utils.clip_grad_norm_([param], float(self.max_grad_norm or 0.0))
            adafactor_step_param(self.optimizer, param, group)
            param.grad = None

        return hook

    def remove(self) -> None:
        """Take the hooks off; the parameters train normally again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        _unmark(self._params)


def enable_fused_backward(optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None) -> FusedBackward:
    """The hooks of ``--fused_backward_pass`` on every trainable parameter of ``optimizer``."""
    return FusedBackward(optimizer, max_grad_norm)


def block_key(name: str) -> GroupKey:
    """('double', N) for ``double_blocks.N.*``, ('single', N) for ``single_blocks.N.*``, else 'other'."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] in ("double_blocks", "single_blocks") and parts[1].isdigit():
        return (parts[0].removesuffix("_blocks"), int(parts[1]))
    return "other"


def key_name(key: GroupKey) -> str:
    """The state-dict key of a group: 'double.3', 'single.10', 'other'."""
    return key if isinstance(key, str) else f"{key[0]}.{key[1]}"


class BlockwiseFusedOptimizers:
    """``--blockwise_fused_optimizers``: one optimizer (``make_optimizer(params)``) per block of ``model``;
    when every trainable parameter of a block has its gradient, the block is clipped (if ``max_grad_norm``,
    over the block's parameters), its optimizer steps and its gradients are freed. The loop calls
    ``loss.backward()`` only. Gradient accumulation is not supported (each backward is a step)."""

    def __init__(
        self,
        model: nn.Module,
        make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
        max_grad_norm: float | None = None,
    ) -> None:
        self.max_grad_norm = max_grad_norm
        self.groups: dict[GroupKey, list[nn.Parameter]] = {}
        self.names: dict[GroupKey, list[str]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                key = block_key(name)
                self.groups.setdefault(key, []).append(p)
                self.names.setdefault(key, []).append(name)
        self._params = [p for ps in self.groups.values() for p in ps]
        _mark(self._params, "blockwise_fused_optimizers")
        self.optimizers = {key: make_optimizer(ps) for key, ps in self.groups.items()}
        self._arrived = dict.fromkeys(self.groups, 0)
        self._handles = [
            p.register_post_accumulate_grad_hook(self._hook(key)) for key, ps in self.groups.items() for p in ps
        ]

    def _hook(self, key: GroupKey) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            self._arrived[key] += 1
            if self._arrived[key] == len(self.groups[key]):
                self._step(key)

        return hook

    def _step(self, key: GroupKey) -> None:
        if _clip_enabled(self.max_grad_norm):
            nn.utils.clip_grad_norm_(self.groups[key], float(self.max_grad_norm or 0.0))
        self.optimizers[key].step()
        self.optimizers[key].zero_grad(set_to_none=True)
        self._arrived[key] = 0

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {key_name(key): opt.state_dict() for key, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        expected = {key_name(key) for key in self.optimizers}
        if set(state) != expected:
            raise ValueError(f"optimizer state has groups {sorted(state)}, the model has {sorted(expected)}")
        for key, opt in self.optimizers.items():
            opt.load_state_dict(state[key_name(key)])

    def remove(self) -> None:
        """Take the hooks off (the optimizers stay usable)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        _unmark(self._params)
