"""K copies of a probe computed together: the stacked-copy machinery behind a learning-rate sweep.

A sweep trains one copy of a probe head per learning rate (and per seed). `ProbeStack` computes all
copies in batched calls instead of one after the other: heads that learn nothing ([cls], mean) pool
each batch once; AbMILP and the attention-only attentive probe pool every copy in one batched call
(`stacked_pooled`); the BatchNorms and Linears of all copies run as one. Each copy still computes
exactly what it would alone (the tests compare them); only the speed differs.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checks import SelaggError, all_finite
from ..features import TokenSet
from ..heads import NEGLIGIBLE, AbMILP, Aggregator, AttentivePool, negligible_grad_dropped

__all__ = ["ProbeStack", "stack_accuracy", "stack_correct", "diverged_copies", "training_source"]


# ----------------------------------------------------------------------------- pooling heads, K copies at once
class _SoftmaxPooled(torch.autograd.Function):
    """Softmax over tokens, then the weighted sum of the tokens, with a backward laid out for speed.

    scores (S, L, B, T), tokens (S, B, T, D) -> pooled (S, B, L, D). Weights below 1e-30 are set to
    0 before they are used or saved (see `heads.masked_softmax`), so no denormal float enters the backward.
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        weights = F.threshold(scores.softmax(dim=-1), NEGLIGIBLE, 0.0)  # (S, L, B, T)
        ctx.save_for_backward(weights, tokens)
        ctx.scores_dtype = scores.dtype
        return weights.transpose(1, 2) @ tokens

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        weights, tokens = ctx.saved_tensors
        low = grad.dtype  # the products run in the dtype the forward's product had (bf16 under autocast)
        grad_scores = grad_tokens = None
        if ctx.needs_input_grad[0]:  # tokens @ grad^T: a faster product on a CPU than grad @ tokens^T
            grad_weights = (tokens.to(low) @ grad.transpose(-1, -2)).permute(0, 3, 1, 2).to(weights.dtype)
            grad_scores = weights * (grad_weights - (weights * grad_weights).sum(-1, keepdim=True))
            grad_scores = grad_scores.to(ctx.scores_dtype)
        if ctx.needs_input_grad[1]:
            grad_tokens = (weights.to(low).permute(0, 2, 3, 1) @ grad).to(tokens.dtype)
        return grad_scores, grad_tokens


def softmax_pooled(scores: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Tokens (S, B, T, D) pooled with softmax(scores) over T, scores (S, L, B, T): pooled (S, B, L, D)."""
    return _SoftmaxPooled.apply(scores, tokens)


def _stacked_linear(x: torch.Tensor, layers: list) -> torch.Tensor:
    """K linear layers in S groups of L: x (S, B, T, I) per group or (S, B, T, L, I) per copy -> (S, B, T, L, O)."""
    w = torch.stack([layer.weight for layer in layers])  # (K, O, I)
    b = torch.stack([layer.bias for layer in layers])  # (K, O)
    s, k, (o, i) = x.shape[0], len(layers), w.shape[1:]
    w, b = w.reshape(s, k // s, o, i), b.reshape(s, k // s, o)
    if x.ndim == 4:  # one matmul per group: (S, B*T, I) @ (S, I, L*O)
        out = (x.reshape(s, -1, i) @ w.permute(0, 3, 1, 2).reshape(s, i, -1)).reshape(*x.shape[:3], k // s, o)
    else:
        out = torch.einsum("sbtli,sloi->sbtlo", x, w)
    return out + b[:, None, None]


def _stacked_scores(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """K affine scorers with O outputs, in S groups of L, on x (S, B, T, I): scores (S, L * O, B, T).

    weight is (K, O, I), bias (K, O). Computed as W x^T, so that the weight gradient is the fast
    (L * O, B * T) @ (B * T, I) product on a CPU.
    """
    s, (b, t, i), (k, o) = x.shape[0], x.shape[1:], bias.shape
    w = weight.reshape(s, k // s * o, i)
    return torch.baddbmm(bias.reshape(s, -1, 1), w, x.reshape(s, b * t, i).transpose(1, 2)).reshape(s, -1, b, t)


def _copies_first(x: torch.Tensor) -> torch.Tensor:
    """(S, B, L, ...) -> (K = S * L, B, ...)."""
    return x.transpose(1, 2).flatten(0, 1)


def can_stack(pool: Aggregator) -> bool:
    """Whether copies of this pooling head can be computed in one batched call.

    AbMILP can, but for its self-attention variant; the attentive probe can when it is attention only.
    """
    if isinstance(pool, AbMILP):
        return pool.mix is None
    if isinstance(pool, AttentivePool):
        return pool.attn.mlp is None and isinstance(pool.attn.q_norm, nn.Identity)
    return False


def stacked_pooled(copies: list[Aggregator], tokens: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Pooled features of K copies of one stackable head (see `can_stack`) in one batched call, (K, B, D).

    `tokens` is (B, T, D), shared by all copies, or (S, B, T, D): S groups of K / S consecutive copies,
    each group with its own batch. `keep` (the tokens that may be pooled) is (B, T) or None.
    """
    if isinstance(copies[0], AbMILP):
        return abmilp_stacked(copies, tokens, keep)
    return attentive_stacked(copies, tokens, keep)


def abmilp_stacked(copies: list[AbMILP], tokens: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """AbMILP's pooled features for K copies, (K, B, D); tokens and keep as in `stacked_pooled`."""
    first = copies[0]
    x = tokens if tokens.ndim == 4 else tokens[None]  # (S, B, T, D)
    h = x
    if first.pos_embed is not None:
        pad = h.new_zeros(first.num_prefix_tokens, h.shape[-1])
        h = h + torch.cat([pad, first.pos_embed.to(h.dtype)])
    for i, layer in enumerate(first.body):
        h = _stacked_linear(h, [c.body[i] for c in copies]) if isinstance(layer, nn.Linear) else layer(h)
    if first.gated:
        h = torch.tanh(_stacked_linear(h, [c.value for c in copies])) * \
            torch.sigmoid(_stacked_linear(h, [c.gate for c in copies]))
    if h.ndim == 4:  # one linear scorer on the tokens themselves: scores come out as (S, L, B, T)
        scores = _stacked_scores(h, torch.stack([c.score.weight for c in copies]),
                                 torch.stack([c.score.bias for c in copies]))
    else:
        scores = _stacked_linear(h, [c.score for c in copies]).squeeze(-1).permute(0, 3, 1, 2)
    pooled = first.pooled_positions(x.shape[2], first.include_cls).to(x.device)
    pooled = pooled if keep is None else pooled & keep
    return _copies_first(softmax_pooled(scores.masked_fill(~pooled, float("-inf")), x))


def attentive_stacked(copies: list[AttentivePool], tokens: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The attention-only attentive probe's pooled features for K copies, (K, B, D); tokens as in `stacked_pooled`."""
    a, p = copies[0].attn, copies[0].num_prefix_tokens
    patches = (tokens if tokens.ndim == 4 else tokens[None])[:, :, p:]  # (S, B, N, C)
    groups, c, heads, hd = patches.shape[0], patches.shape[-1], a.num_heads, a.head_dim
    k = len(copies)
    q = torch.stack([x.attn.q(x.attn.latent[0, 0]) for x in copies]).reshape(k, heads, hd) * a.scale
    kv_w = torch.stack([x.attn.kv.weight for x in copies]).reshape(k, 2, heads, hd, c)
    kv_b = torch.stack([x.attn.kv.bias for x in copies]).reshape(k, 2, heads, hd)
    u = torch.einsum("khd,khdc->khc", q, kv_w[:, 0])  # the query folded into the key projection
    bias = torch.einsum("khd,khd->kh", q, kv_b[:, 0])
    logits = _stacked_scores(patches, u, bias)  # (S, L * heads, B, N)
    if keep is not None:
        logits = logits.masked_fill(~keep[:, p:], float("-inf"))
    mixed = softmax_pooled(logits, patches).reshape(groups, -1, k // groups, heads, c)  # (S, B, L, heads, C)
    w_v = kv_w[:, 1].reshape(groups, k // groups, heads, hd, c)
    out = torch.einsum("sblhc,slhdc->sblhd", mixed, w_v).flatten(3)  # (S, B, L, C)
    return _copies_first(out) + kv_b[:, 1].reshape(k, 1, c)


# ----------------------------------------------------------------------------- probe heads, K copies at once
class ProbeStack(nn.Module):
    """K probe heads computed together; logits (K, B, classes).

    With `groups` = S > 1 the K heads form S consecutive groups (e.g. one per seed), and the tokens
    come as (S, B, T, D): group s trains on its own batch. With S = 1 all heads share (B, T, D).
    With `prepooled`, the stack reads features its heads pooled in advance, (B, D) or (S, B, D),
    instead of tokens; only heads that learn nothing ([cls], mean) can be trained that way.
    """

    def __init__(self, heads: list[nn.Module], groups: int = 1, prepooled: bool = False):
        super().__init__()
        if len(heads) % groups:
            raise SelaggError(f"{len(heads)} heads cannot be split into {groups} equal groups.")
        self.heads = nn.ModuleList(heads)
        self.groups = groups
        self.prepooled = False
        self.reading_pooled(prepooled)

    @classmethod
    def copies(cls, head: nn.Module, k: int) -> "ProbeStack":
        """K identical copies of one head (to be trained with K learning rates)."""
        return cls([copy.deepcopy(head) for _ in range(k)])

    @property
    def learns_pooling(self) -> bool:
        """Whether the pooling heads have parameters (False for [cls] and mean: their features can be pooled once)."""
        return next(self.heads[0].pool.parameters(), None) is not None

    def reading_pooled(self, prepooled: bool = True) -> "ProbeStack":
        """This stack, set to read features pooled in advance (True) or tokens (False)."""
        if prepooled and self.learns_pooling:
            raise SelaggError("Only heads that learn nothing ([cls], mean) can read features pooled in advance; "
                              "pass the tokens themselves to a learned head such as 'abmilp'.")
        self.prepooled = bool(prepooled)
        return self

    def pooled(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features of every head, (K, B, D)."""
        first = self.heads[0].pool
        per_group = len(self.heads) // self.groups
        if tokens.ndim == 4:
            if keep is not None:
                raise SelaggError("Grouped training batches take no keep mask; pass keep=None.")
            s, b = tokens.shape[:2]
            tokens = first.check(tokens.flatten(0, 1), None)[0].reshape(s, b, *tokens.shape[2:])
        else:
            tokens, keep = first.check(tokens, keep)
        if not self.learns_pooling:  # cls / mean: nothing learned, pool once per batch
            flat = tokens.flatten(0, 1) if tokens.ndim == 4 else tokens
            z = first.pool(flat, keep)[0]
            z = z.reshape(self.groups, -1, z.shape[-1]) if tokens.ndim == 4 else z.expand(self.groups, -1, -1)
            return z.repeat_interleave(per_group, dim=0)
        if can_stack(first):
            return stacked_pooled([h.pool for h in self.heads], tokens, keep)
        return torch.stack([h.pool.pool(tokens[k // per_group] if tokens.ndim == 4 else tokens, keep)[0]
                            for k, h in enumerate(self.heads)])

    def normalised(self, z: torch.Tensor) -> torch.Tensor:
        """Each copy's BatchNorm (batch statistics in training, running ones in eval), as one (B, K*D) BatchNorm."""
        bns = [h.bn for h in self.heads]
        k, b, d = z.shape
        mean = torch.cat([bn.running_mean for bn in bns])
        var = torch.cat([bn.running_var for bn in bns])
        flat = F.batch_norm(z.transpose(0, 1).reshape(b, k * d), mean, var, training=self.training,
                            momentum=bns[0].momentum, eps=bns[0].eps)
        if self.training:
            with torch.no_grad():
                torch._foreach_copy_([bn.running_mean for bn in bns] + [bn.running_var for bn in bns],
                                     list(mean.split(d)) + list(var.split(d)))
                torch._foreach_add_([bn.num_batches_tracked for bn in bns], 1)
        return flat.reshape(b, k, d).transpose(0, 1).contiguous()  # contiguous: a much faster matmul backward

    def shared_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Training logits (K, B, classes) when each group's copies read the same pooled features (S, B, D).

        Their batch statistics are then the same: one BatchNorm and one product per group serve all
        copies, and each copy's running statistics are updated with them as its own BatchNorm would.
        """
        s, b, d = z.shape
        per = len(self.heads) // self.groups
        bns = [h.bn for h in self.heads]
        batch_mean, batch_var = torch.zeros(s, d, device=z.device), torch.zeros(s, d, device=z.device)
        flat = F.batch_norm(z.transpose(0, 1).reshape(b, s * d), batch_mean.view(-1), batch_var.view(-1),
                            training=True, momentum=1.0, eps=bns[0].eps)  # running stats <- this batch's
        with torch.no_grad():
            m = bns[0].momentum
            means, variances = [bn.running_mean for bn in bns], [bn.running_var for bn in bns]
            torch._foreach_mul_(means + variances, 1 - m)
            torch._foreach_add_(means + variances, [batch_mean[k // per] for k in range(len(bns))]
                                + [batch_var[k // per] for k in range(len(bns))], alpha=m)
            torch._foreach_add_([bn.num_batches_tracked for bn in bns], 1)
        zn = flat.reshape(b, s, d).transpose(0, 1)  # (S, B, D)
        w = torch.stack([h.linear.weight for h in self.heads])  # (K, C, D)
        bias = torch.stack([h.linear.bias for h in self.heads])
        c = w.shape[1]
        logits = torch.baddbmm(bias.reshape(s, 1, per * c), zn, w.reshape(s, per * c, d).transpose(1, 2))
        return logits.reshape(s, b, per, c).permute(0, 2, 1, 3).reshape(-1, b, c)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits of every copy, (K, B, classes)."""
        if self.prepooled:  # features already pooled: (B, D) shared or (S, B, D) per group
            z = tokens.expand(self.groups, -1, -1) if tokens.ndim == 2 else tokens
            if self.training:
                return negligible_grad_dropped(self.shared_logits(z))
            z = z.repeat_interleave(len(self.heads) // self.groups, dim=0)
        else:
            z = self.pooled(tokens, keep)
        z = self.normalised(z)
        w = torch.stack([h.linear.weight for h in self.heads])
        b = torch.stack([h.linear.bias for h in self.heads])
        return negligible_grad_dropped(torch.baddbmm(b[:, None], z, w.transpose(1, 2)))


@torch.no_grad()
def stack_accuracy(stack: ProbeStack, tokens: torch.Tensor, labels: torch.Tensor,
                   batch_size: int = 1024) -> list[float]:
    """Accuracy of every copy, in eval mode."""
    return (stack_correct(stack, tokens, labels, batch_size) / len(labels)).tolist()


@torch.no_grad()
def stack_correct(stack: ProbeStack, tokens: torch.Tensor, labels: torch.Tensor,
                  batch_size: int = 1024) -> torch.Tensor:
    """How many images every copy classifies correctly, (K,) float32, in eval mode."""
    stack.eval()
    correct = torch.zeros(len(stack.heads))
    for i in range(0, len(labels), batch_size):
        logits = stack(tokens[i:i + batch_size].float())
        correct += (logits.argmax(-1).cpu() == labels[i:i + batch_size]).sum(1)
    return correct


def diverged_copies(stack: ProbeStack) -> list[bool]:
    """For each copy in a stack, whether training left NaN or infinite weights or statistics."""
    return [not all(all_finite(t) for t in [*head.parameters(), *head.buffers()]) for head in stack.heads]


def training_source(stack: ProbeStack, train: TokenSet, device: str | torch.device,
                    max_bytes: int = 2 ** 31) -> Callable[[torch.Tensor], torch.Tensor]:
    """Batches for training: pooled once when the head learns nothing (cls, mean), else float tokens.

    For a head that learns nothing the stack is set to read pooled features (`reading_pooled`);
    set it back with `stack.reading_pooled(False)` before scoring it on tokens.
    """
    pool = stack.heads[0].pool
    if not stack.learns_pooling:
        with torch.no_grad():
            pooled = torch.cat([pool(train.tokens[i:i + 1024].float())[0] for i in range(0, len(train), 1024)])
        stack.reading_pooled(True)
        pooled = pooled.to(device)
        return lambda idx: pooled[idx.to(device)]
    if train.tokens.numel() * 4 <= max_bytes:  # small enough: convert to float32 once
        tokens = train.tokens.to(device).float()
        return lambda idx: tokens[idx.to(device)]
    if torch.device(device).type == "cuda" and train.tokens.numel() * 2 <= 4 * max_bytes:  # float16 on the GPU
        tokens = train.tokens.to(device)
        return lambda idx: tokens[idx.to(device)].float()
    return lambda idx: train.tokens[idx].to(device).float()
