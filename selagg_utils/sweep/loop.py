"""The training loop of a learning-rate sweep: `probing.train_one_probe`'s loop, for many copies at once.

`fit_stack` is the reference loop of `probing` (the same batches, schedule, loss and optimizer
arithmetic), run on a `ProbeStack` of K copies: each step reads one batch, computes every copy's
logits in one batched call and updates every copy, each at its own learning rate, in one
multi-tensor step. `sweep_copies` is what `probing.train_probes` calls.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from torch import nn

from ..config import progress_bar
from ..features import TokenSet
from .optimizers import make_optimizer
from .stacks import ProbeStack, diverged_copies, stack_accuracy, training_source

__all__ = ["sweep_copies", "fit_stack"]


def sweep_copies(heads: list[nn.Module], train: TokenSet, val: TokenSet, recipe, seeds: tuple[int, ...],
                 device: str | torch.device) -> tuple[list[float], list[bool], list[float]]:
    """Train `heads` in place, len(seeds) groups of one copy per learning rate of `recipe` (a
    `probing.ProbeRecipe`); return each copy's val accuracy, whether it diverged, and the loss per step."""
    stack = ProbeStack(heads, groups=len(seeds)).to(device)
    losses = fit_stack(stack, training_source(stack, train, device), train.labels, recipe, list(seeds))
    stack.reading_pooled(False)  # scored on tokens from here on
    return stack_accuracy(stack, val.tokens.to(device), val.labels), diverged_copies(stack), losses


def fit_stack(stack: ProbeStack, tokens_of: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
              recipe, seed: int | list[int] = 0, progress: bool = False,
              backward_of: Callable[[torch.Tensor], float] | None = None) -> list[float]:
    """Train the stack; `tokens_of(indices)` gives the tokens of a batch; returns the mean loss per step.

    `seed` (one per group) seeds each group's batch order; every group trains the recipe's learning
    rates, scaled by batch / 256. `backward_of(indices)`, when given, replaces the forward and
    backward pass of a batch (indices (S, B) into `labels`) and returns its mean loss per copy;
    `scaleout.ddp_probing` passes one that spans processes.
    """
    seeds = [seed] * stack.groups if isinstance(seed, int) else list(seed)
    n = len(labels)
    bs = min(recipe.batch_size, n)
    per_epoch = n // bs
    total = max(recipe.epochs * per_epoch, recipe.min_steps)
    warmup = round(total * recipe.warmup_epochs / recipe.epochs) if recipe.epochs else 0
    lrs = recipe.scaled_lrs(bs) * stack.groups
    optimizer = make_optimizer(stack, recipe, lrs)
    schedule = CosineLRScheduler(optimizer, t_initial=max(total - warmup, 1), warmup_t=warmup, warmup_prefix=True,
                                 t_in_epochs=False)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    backward_of = backward_of or cross_entropy_backward(stack, tokens_of, labels, bs)
    stack.train()
    losses: list[float] = []
    bar = progress_bar(total=total, enabled=progress, desc="training probes", leave=False)
    while len(losses) < total:
        orders = torch.stack([torch.randperm(n, generator=g) for g in generators])
        for i in range(per_epoch):
            if len(losses) == total:
                break
            idx = orders[:, i * bs:(i + 1) * bs]  # (S, B)
            schedule.step_update(len(losses))
            optimizer.zero_grad(set_to_none=True)
            losses.append(backward_of(idx))
            optimizer.step()
            bar.update()
    bar.close()
    return losses


def cross_entropy_backward(stack: ProbeStack, tokens_of: Callable[[torch.Tensor], torch.Tensor],
                           labels: torch.Tensor, bs: int) -> Callable[[torch.Tensor], float]:
    """The forward and backward pass of one batch of indices (S, B) in one process; returns the mean loss per copy."""
    per_group = len(stack.heads) // stack.groups

    def backward_of(idx: torch.Tensor) -> float:
        logits = stack(tokens_of(idx[0] if stack.groups == 1 else idx))
        y = labels[idx].to(logits.device).repeat_interleave(per_group, dim=0)  # (K, B)
        # classes in the middle, (K, classes, B): on a CPU, cross-entropy over a dimension with a
        # long inner one runs about twice as fast as over the last dimension of (K * B, classes)
        loss = F.cross_entropy(logits.transpose(1, 2).contiguous(), y, reduction="sum") / bs
        loss.backward()
        return loss.item() / len(stack.heads)
    return backward_of


