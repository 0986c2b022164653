"""The sweep optimizers: timm's LARS and torch's AdamW, each copy of a probe with its own learning rate.

A learning-rate sweep trains K copies of a probe together, each in its own parameter groups. The
optimizers here do the arithmetic of timm's `Lars` and torch's `AdamW` on every group at once
(one multi-tensor update), where the originals would step the groups one by one in Python.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from timm.optim import Lars

from ..checks import SelaggError

if TYPE_CHECKING:
    from .stacks import ProbeStack

__all__ = ["make_optimizer"]

#: The optimizers a `ProbeRecipe` may name.
OPTIMIZERS = ("lars", "adamw")


class _OneUpdateForAllGroups:
    """Optimizer mixin: groups that share all settings but the learning rate are stepped in one update.

    A learning-rate sweep has two small parameter groups per copy; stepping them one by one costs
    far more in Python than in arithmetic. `_update` gets the settings, the parameters that have a
    gradient, and each one's learning rate.
    """

    _SETTINGS: tuple[str, ...] = ()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        alike: dict[tuple, list[dict]] = {}
        for group in self.param_groups:
            alike.setdefault(tuple(group[key] for key in self._SETTINGS), []).append(group)
        for settings, groups in alike.items():
            pairs = [(p, g["lr"]) for g in groups for p in g["params"] if p.grad is not None]
            if pairs:
                self._update(dict(zip(self._SETTINGS, settings)), [p for p, _ in pairs], [lr for _, lr in pairs])
        return loss


class SweepLars(_OneUpdateForAllGroups, Lars):
    """timm's LARS with the same arithmetic, every tensor with its own group's lr and its own trust ratio."""

    _SETTINGS = ("momentum", "dampening", "weight_decay", "nesterov", "trust_coeff", "eps", "trust_clip",
                 "always_adapt")

    def _update(self, s: dict, params: list[torch.Tensor], lrs: list[float]) -> None:
        grads = [p.grad for p in params]
        if s["weight_decay"] != 0 or s["always_adapt"]:
            w_norm, g_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(grads))
            ratio = s["trust_coeff"] * w_norm / (g_norm + w_norm * s["weight_decay"] + s["eps"])
            ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)  # 1 (no change) if either norm is 0
            if s["trust_clip"]:
                ratio = (ratio / torch.tensor(lrs, dtype=ratio.dtype, device=ratio.device)).clamp(max=1.0)
            if s["weight_decay"]:  # new tensors: p.grad itself is left alone
                grads = torch._foreach_add(grads, params, alpha=s["weight_decay"])
                torch._foreach_mul_(grads, list(ratio.unbind()))
            else:
                grads = torch._foreach_mul(grads, list(ratio.unbind()))
        if s["momentum"] != 0:
            bufs = [self.state[p].get("momentum_buffer") for p in params]
            old = [i for i, buf in enumerate(bufs) if buf is not None]
            if old:
                torch._foreach_mul_([bufs[i] for i in old], s["momentum"])
                torch._foreach_add_([bufs[i] for i in old], [grads[i] for i in old], alpha=1.0 - s["dampening"])
            for i, (p, buf) in enumerate(zip(params, bufs)):
                if buf is None:
                    bufs[i] = self.state[p]["momentum_buffer"] = grads[i].detach().clone()
            grads = torch._foreach_add(grads, bufs, alpha=s["momentum"]) if s["nesterov"] else bufs
        torch._foreach_add_(params, torch._foreach_mul(grads, [-lr for lr in lrs]))


class SweepAdamW(_OneUpdateForAllGroups, torch.optim.AdamW):
    """torch's AdamW with the same arithmetic and state (step, exp_avg, exp_avg_sq), every tensor with its own lr."""

    _SETTINGS = ("betas", "eps", "weight_decay")

    def __init__(self, params, **kwargs):
        if kwargs.get("amsgrad") or kwargs.get("maximize"):
            raise SelaggError("SweepAdamW supports neither amsgrad nor maximize; use torch.optim.AdamW.")
        super().__init__(params, **kwargs)

    def _update(self, s: dict, params: list[torch.Tensor], lrs: list[float]) -> None:
        for p in params:
            if not self.state[p]:
                self.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                     exp_avg_sq=torch.zeros_like(p))
        states = [self.state[p] for p in params]
        steps = [st["step"] for st in states]
        avgs, avg_sqs = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
        grads = [p.grad for p in params]
        (beta1, beta2), eps, weight_decay = s["betas"], s["eps"], s["weight_decay"]
        torch._foreach_add_(steps, 1.0)
        if weight_decay != 0:
            torch._foreach_mul_(params, [1 - lr * weight_decay for lr in lrs])
        torch._foreach_lerp_(avgs, grads, 1 - beta1)
        torch._foreach_mul_(avg_sqs, beta2)
        torch._foreach_addcmul_(avg_sqs, grads, grads, 1 - beta2)
        counts = [float(step) for step in steps]
        denom = torch._foreach_sqrt(avg_sqs)
        torch._foreach_div_(denom, [(1 - beta2 ** n) ** 0.5 for n in counts])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, avgs, denom, [-lr / (1 - beta1 ** n) for lr, n in zip(lrs, counts)])


def make_optimizer(stack: ProbeStack, recipe, lrs: list[float]) -> torch.optim.Optimizer:
    """One parameter group pair per copy (matrices; vectors without decay or LARS adaptation), each with its lr;
    `recipe` is a `probing.ProbeRecipe`."""
    groups = []
    for head, lr in zip(stack.heads, lrs):
        params = [p for p in head.parameters() if p.requires_grad]
        groups.append({"params": [p for p in params if p.ndim > 1], "lr": lr, "weight_decay": recipe.weight_decay,
                       **({"always_adapt": True} if recipe.optimizer == "lars" else {})})
        groups.append({"params": [p for p in params if p.ndim <= 1], "lr": lr, "weight_decay": 0.0})
    groups = [g for g in groups if g["params"]]
    if recipe.optimizer == "lars":
        return SweepLars(groups, lr=lrs[0], momentum=recipe.momentum)
    if recipe.optimizer == "adamw":
        return SweepAdamW(groups, lr=lrs[0])
    raise SelaggError(f"Unknown optimizer {recipe.optimizer!r}; choose 'lars' (MAE's protocol) or 'adamw'.")
