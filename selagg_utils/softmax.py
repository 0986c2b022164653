"""Softmax weights and gradients without denormal floats: what keeps a probe sweep fast on a CPU.

At the large learning rates of a sweep, some heads grow so confident that softmax weights underflow
below 1.2e-38, where a CPU computes tens of times slower. Such weights cannot change a weighted sum
whose weights add up to 1, so the heads (`aggregation`), their stacked copies (`stacking`) and the
distributed loss (`ddp_probing`) set weights, and gradients, below `NEGLIGIBLE` to exactly 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["NEGLIGIBLE", "negligible_grad_dropped", "masked_softmax"]

NEGLIGIBLE = 1e-30


class _NegligibleGradDropped(torch.autograd.Function):
    """Identity; on the way back, gradient entries below NEGLIGIBLE in magnitude become 0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.masked_fill(grad.abs() < NEGLIGIBLE, 0.0)


def negligible_grad_dropped(x: torch.Tensor) -> torch.Tensor:
    """`x` itself, but the gradient that flows back through it has its entries below 1e-30 set to 0.

    Such entries cannot change a float32 sum with gradients of a loss of order 1, but below 1.2e-38
    (denormal floats) a CPU computes them tens of times slower: a probe sweep at large learning
    rates, where softmax probabilities underflow, would spend most of its time on them.
    """
    return _NegligibleGradDropped.apply(x)


def masked_softmax(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension where `keep` is True; exactly 0 elsewhere and where below 1e-30.

    Weights that small cannot change a weighted sum of tokens (the weights add up to 1); setting
    them and their scores' gradient to 0 keeps a CPU off denormal floats (see `negligible_grad_dropped`).
    """
    weights = negligible_grad_dropped(scores).masked_fill(~keep, float("-inf")).softmax(dim=-1)
    return F.threshold(weights, NEGLIGIBLE, 0.0)
