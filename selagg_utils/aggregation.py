"""Pooling heads: frozen tokens (B, T, D) in, one vector per image (B, D) and the weight each token got out.

Tokens come as a ViT emits them: `num_prefix_tokens` prefix tokens first ([cls] at index 0 when the
model has one, then register tokens), then the patch tokens in raster order. Every head returns
`(pooled, weights)` where `weights` is (B, T) over *all* input tokens and sums to 1 per image; tokens
a head does not pool (registers, and [cls] unless asked for) get weight 0.
"""
from __future__ import annotations

import inspect
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, AttentionPoolLatent, build_sincos2d_pos_embed

from .checks import whole_number
from .errors import SelaggError

HEADS = ("cls", "mean", "abmilp", "abmilp-tanh", "abmilp-relu", "abmilp-gated", "abmilp-sa", "abmilp-pos",
         "abmilp-cls", "attentive")


class Aggregator(nn.Module):
    """Base class: `forward` checks tokens and mask, then `pool` does the work (checks done once, outside)."""

    def __init__(self, dim: int, num_prefix_tokens: int = 1, has_cls: bool = True):
        super().__init__()
        whole_number(dim, "dim", 1, "pass the backbone's token width (embed_dim), e.g. 768")
        whole_number(num_prefix_tokens, "num_prefix_tokens", 0, "pass how many tokens precede the patches "
                     "([cls] plus registers; models.num_prefix_tokens(model) gives it)")
        if has_cls and num_prefix_tokens < 1:
            raise SelaggError(f"A model with a [cls] token has at least 1 prefix token, got num_prefix_tokens="
                              f"{num_prefix_tokens}; pass has_cls=False for a model without [cls].")
        self.dim, self.num_prefix_tokens, self.has_cls = dim, num_prefix_tokens, has_cls
        self.out_dim = dim

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled (B, D), weights (B, T)) for tokens (B, T, D) and an optional keep-mask (B, T) or (B, patches)."""
        tokens, mask = self.check(tokens, mask)
        return self.pool(tokens, mask)

    def check(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validated tokens in the head's dtype and a full (B, T) boolean mask (or None)."""
        tokens = check_tokens(tokens, self.dim, self.num_prefix_tokens)
        ref = next(self.parameters(), None)
        if ref is not None and tokens.dtype != ref.dtype:
            tokens = tokens.to(ref.dtype)
        return tokens, check_mask(mask, tokens, self.num_prefix_tokens)

    def pool(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled, weights) for checked tokens and a full (B, T) mask or None."""
        raise NotImplementedError

    def pooled_positions(self, num_tokens: int, include_cls: bool = False) -> torch.Tensor:
        """Boolean (T,) of the tokens this head may pool: the patches, plus [cls] if asked."""
        keep = torch.zeros(num_tokens, dtype=torch.bool)
        keep[self.num_prefix_tokens:] = True
        if include_cls:
            keep[0] = True
        return keep


def check_tokens(tokens: torch.Tensor, dim: int | None = None, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Raise a clear error unless tokens are a floating (B, T, D) tensor with patch tokens after the prefix."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise SelaggError(f"Tokens must be a (batch, tokens, dim) tensor, got {shape}; "
                          "pass the backbone's output tokens, e.g. model.forward_features(images).")
    if not tokens.is_floating_point():
        raise SelaggError(f"Tokens must be floating point (float16/bfloat16/float32/float64), got {tokens.dtype}; "
                          "convert them with tokens.float().")
    if dim is not None and tokens.shape[-1] != dim:
        raise SelaggError(f"Tokens have width {tokens.shape[-1]} but the head was built for {dim}; "
                          "build the head with the backbone's embed_dim.")
    if tokens.shape[1] <= num_prefix_tokens:
        raise SelaggError(f"Got {tokens.shape[1]} tokens but the head expects {num_prefix_tokens} prefix tokens "
                          "followed by patch tokens; pass all output tokens, not only the prefix.")
    return tokens


def check_mask(mask: torch.Tensor | None, tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor | None:
    """A boolean keep-mask over all T tokens; a (B, patches) mask is extended with the prefix tokens kept."""
    if mask is None:
        return None
    b, t, _ = tokens.shape
    n = t - num_prefix_tokens
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[0] != b or mask.shape[1] not in (t, n):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise SelaggError(f"The mask has shape {shape} but the tokens need ({b}, {t}) over all tokens or "
                          f"({b}, {n}) over patch tokens; True marks a token that may be pooled.")
    if mask.dtype != torch.bool:
        raise SelaggError(f"The mask must be boolean (True = may be pooled), got {mask.dtype}; use mask.bool().")
    if mask.shape[1] == n:
        mask = torch.cat([mask.new_ones(b, num_prefix_tokens), mask], dim=1)
    mask = mask.to(tokens.device)
    if not mask[:, num_prefix_tokens:].any(dim=1).all():
        raise SelaggError("The mask leaves an image without any patch token to pool; "
                          "keep at least one patch per image.")
    return mask


def _keep(head: Aggregator, tokens: torch.Tensor, mask: torch.Tensor | None, include_cls: bool = False) -> torch.Tensor:
    """(B, T) boolean of the tokens pooled: the head's positions and the caller's mask together."""
    keep = head.pooled_positions(tokens.shape[1], include_cls).to(tokens.device).expand(tokens.shape[0], -1)
    return keep if mask is None else keep & mask


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


class _SoftmaxPooled(torch.autograd.Function):
    """Softmax over tokens, then the weighted sum of the tokens, with a backward laid out for speed.

    scores (S, L, B, T), tokens (S, B, T, D) -> pooled (S, B, L, D). Weights below 1e-30 are set to
    0 before they are used or saved (see `masked_softmax`), so no denormal float enters the backward.
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


class ClsPool(Aggregator):
    """The [cls] token itself (the usual linear-probe input)."""

    def __init__(self, dim: int, num_prefix_tokens: int = 1, has_cls: bool = True):
        super().__init__(dim, num_prefix_tokens, has_cls)
        if not has_cls:
            raise SelaggError("This model has no [cls] token, so 'cls' pooling is impossible; "
                              "use 'mean' or 'abmilp' (models such as I-JEPA are probed on mean-pooled patches).")

    def pool(self, tokens, mask):
        weights = torch.zeros(tokens.shape[:2], dtype=tokens.dtype, device=tokens.device)
        weights[:, 0] = 1.0
        return tokens[:, 0], weights


class MeanPool(Aggregator):
    """The plain average of the patch tokens (global average pooling)."""

    def pool(self, tokens, mask):
        keep = _keep(self, tokens, mask).to(tokens.dtype)
        weights = keep / keep.sum(dim=1, keepdim=True)
        return torch.einsum("bt,btd->bd", weights, tokens), weights


class AbMILP(Aggregator):
    """Attention-based MIL pooling: a learned score per token, softmax over tokens, weighted sum.

    The default is the paper's head: patch tokens only, one Linear(D, 1) scorer. Variants: `depth`
    hidden layers of width `hidden` with `act` ('tanh' or 'relu'); `gated` (Ilse et al.'s
    tanh(Vh) * sigmoid(Uh)); `self_attention` (one single-head self-attention layer mixes the tokens
    that feed the scorer; the pooled values stay the backbone's tokens); `pos_embed` ('sincos': fixed
    2-D sin-cos position codes added to the scorer input of patch tokens, needs `grid_size`);
    `include_cls` (the [cls] token competes with the patches).
    """

    def __init__(self, dim: int, num_prefix_tokens: int = 1, has_cls: bool = True, depth: int = 0,
                 hidden: int = 128, act: str = "tanh", gated: bool = False, self_attention: bool = False,
                 pos_embed: str | None = None, grid_size: tuple[int, int] | None = None, include_cls: bool = False):
        super().__init__(dim, num_prefix_tokens, has_cls)
        if include_cls and not has_cls:
            raise SelaggError("include_cls=True needs a model with a [cls] token; this one has none.")
        if act not in ("tanh", "relu"):
            raise SelaggError(f"Unknown scorer activation {act!r}; choose 'tanh' or 'relu'.")
        if gated and depth < 1:
            depth = 1  # the gate acts on a hidden layer
        self.include_cls, self.gated = include_cls, gated
        self.mix = Attention(dim, num_heads=1, qkv_bias=True) if self_attention else None
        if self.mix is not None:
            self.mix.fused_attn = False  # plain ops: vmap-friendly and deterministic
        self.pos_embed: torch.Tensor | None
        if pos_embed in (None, "none"):
            self.register_buffer("pos_embed", None)
        elif pos_embed == "sincos":
            if not (isinstance(grid_size, (tuple, list)) and len(grid_size) == 2
                    and all(isinstance(g, numbers.Integral) and not isinstance(g, bool) and g > 0 for g in grid_size)):
                raise SelaggError(f"pos_embed='sincos' needs the patch grid as two positive whole numbers, got "
                                  f"grid_size={grid_size!r}; pass e.g. grid_size=(8, 8) (models.patch_grid(model)).")
            self.register_buffer("pos_embed", build_sincos2d_pos_embed(list(grid_size), dim), persistent=False)
        else:
            raise SelaggError(f"Unknown pos_embed {pos_embed!r}; choose None or 'sincos'.")
        activation = nn.Tanh if act == "tanh" else nn.ReLU
        layers: list[nn.Module] = []
        width = dim
        for _ in range(depth - 1 if gated else depth):
            layers += [nn.Linear(width, hidden), activation()]
            width = hidden
        self.body = nn.Sequential(*layers)
        if gated:
            self.value, self.gate = nn.Linear(width, hidden), nn.Linear(width, hidden)
            width = hidden
        self.score = nn.Linear(width, 1)

    def check(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As Aggregator.check, and the number of patch tokens must fit the grid of the position codes."""
        tokens, mask = super().check(tokens, mask)
        if self.pos_embed is not None and tokens.shape[1] - self.num_prefix_tokens != len(self.pos_embed):
            raise SelaggError(f"Got {tokens.shape[1] - self.num_prefix_tokens} patch tokens but the head's position "
                              f"codes cover a grid of {len(self.pos_embed)} patches; build the head with the "
                              "backbone's grid_size (models.patch_grid(model) or TokenSet.grid_size).")
        return tokens, mask

    def scores(self, tokens: torch.Tensor) -> torch.Tensor:
        """One unnormalised score per token, (B, T)."""
        h = tokens
        if self.mix is not None:
            h = self.mix(h)
        if self.pos_embed is not None:
            pad = h.new_zeros(self.num_prefix_tokens, h.shape[-1])
            h = h + torch.cat([pad, self.pos_embed.to(h.dtype)])
        h = self.body(h)
        if self.gated:
            h = torch.tanh(self.value(h)) * torch.sigmoid(self.gate(h))
        return self.score(h).squeeze(-1)

    def pool(self, tokens, mask):
        weights = masked_softmax(self.scores(tokens), _keep(self, tokens, mask, self.include_cls))
        return torch.einsum("bt,btd->bd", weights, tokens), weights

    def can_stack(self) -> bool:
        """Whether copies of this head can be computed in one batched call (all but the self-attention variant)."""
        return self.mix is None

    def pool_stacked(self, copies: list["AbMILP"], tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Pooled features of K copies of this head in one batched call, (K, B, D).

        `tokens` is (B, T, D), shared by all copies, or (S, B, T, D): S groups of K / S consecutive copies,
        each group with its own batch. `mask` is (B, T) or None.
        """
        x = tokens if tokens.ndim == 4 else tokens[None]  # (S, B, T, D)
        h = x
        if self.pos_embed is not None:
            pad = h.new_zeros(self.num_prefix_tokens, h.shape[-1])
            h = h + torch.cat([pad, self.pos_embed.to(h.dtype)])
        for i, layer in enumerate(self.body):
            h = _stacked_linear(h, [c.body[i] for c in copies]) if isinstance(layer, nn.Linear) else layer(h)
        if self.gated:
            h = torch.tanh(_stacked_linear(h, [c.value for c in copies])) * \
                torch.sigmoid(_stacked_linear(h, [c.gate for c in copies]))
        if h.ndim == 4:  # one linear scorer on the tokens themselves: scores come out as (S, L, B, T)
            scores = _stacked_scores(h, torch.stack([c.score.weight for c in copies]),
                                     torch.stack([c.score.bias for c in copies]))
        else:
            scores = _stacked_linear(h, [c.score for c in copies]).squeeze(-1).permute(0, 3, 1, 2)
        keep = self.pooled_positions(x.shape[2], self.include_cls).to(x.device)
        keep = keep if mask is None else keep & mask
        return _copies_first(softmax_pooled(scores.masked_fill(~keep, float("-inf")), x))


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


class AttentivePool(Aggregator):
    """Attentive probe: a learned query cross-attends to the patch tokens (timm's AttentionPoolLatent).

    `weights` are the query's attention probabilities averaged over heads. By default the head is
    attention only (no output projection or MLP: the light probe of Psomas et al.); `mlp=True` adds
    timm's projection and residual MLP block, as in V-JEPA's attentive probe. `pool` computes
    timm's forward in a cheaper order (see `attention`); `pool_reference` runs timm's forward itself.
    """

    def __init__(self, dim: int, num_prefix_tokens: int = 1, has_cls: bool = True, num_heads: int = 4,
                 mlp: bool = False, mlp_ratio: float = 4.0):
        super().__init__(dim, num_prefix_tokens, has_cls)
        if dim % num_heads:
            raise SelaggError(f"The token width {dim} is not divisible by num_heads={num_heads}; pick a divisor.")
        self.attn = AttentionPoolLatent(dim, out_features=dim if mlp else 0, num_heads=num_heads,
                                        mlp_ratio=mlp_ratio, norm_layer=nn.LayerNorm if mlp else None)

    def attention(self, patches: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The latent query's attention over the patch tokens per head: (B, heads, N).

        The query is one learned vector per head, so q . (W_k x + b_k) = (W_k^T q) . x + q . b_k: one
        score vector per head replaces the key projection of every token (same numbers, far fewer FLOPs).
        """
        a = self.attn
        c = patches.shape[-1]
        q = a.q(a.latent)[0].reshape(a.latent_len, a.num_heads, a.head_dim).transpose(0, 1)  # (heads, L, hd)
        w_k = a.kv.weight[:c].reshape(a.num_heads, a.head_dim, c)
        b_k = a.kv.bias[:c].reshape(a.num_heads, a.head_dim) if a.kv.bias is not None else None
        u = torch.einsum("hld,hdc->hlc", q * a.scale, w_k)  # per head and latent, a vector in token space
        logits = torch.einsum("bnc,hlc->bhln", patches, u)
        if b_k is not None:
            logits = logits + torch.einsum("hld,hd->hl", q * a.scale, b_k)[None, :, :, None]
        return masked_softmax(logits, keep[:, None, None, :]).mean(2)

    def pool(self, tokens, mask):
        a, p = self.attn, self.num_prefix_tokens
        patches = tokens[:, p:]
        b, n, c = patches.shape
        keep = torch.ones((b, n), dtype=torch.bool, device=tokens.device) if mask is None else mask[:, p:]
        attn = self.attention(patches, keep)  # (B, heads, N)
        # values: sum_n a_n (W_v x_n + b_v) = W_v (sum_n a_n x_n) + b_v, since the weights sum to 1
        mixed = torch.einsum("bhn,bnc->bhc", attn, patches)
        w_v = a.kv.weight[c:].reshape(a.num_heads, a.head_dim, c)
        x = torch.einsum("bhc,hdc->bhd", mixed, w_v).reshape(b, c)
        if a.kv.bias is not None:
            x = x + a.kv.bias[c:]
        x = a.proj_drop(a.proj(x))
        if a.mlp is not None:
            x = x + a.mlp(a.norm(x))
        return x, F.pad(attn.mean(1), (p, 0))

    def can_stack(self) -> bool:
        """Whether copies can be computed in one batched call (the attention-only head)."""
        return self.attn.mlp is None and isinstance(self.attn.q_norm, nn.Identity)

    def pool_stacked(self, copies: list["AttentivePool"], tokens: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
        """Pooled features of K attention-only copies in one batched call, (K, B, D); tokens as in AbMILP's."""
        a, p = self.attn, self.num_prefix_tokens
        patches = (tokens if tokens.ndim == 4 else tokens[None])[:, :, p:]  # (S, B, N, C)
        groups, c, heads, hd = patches.shape[0], patches.shape[-1], a.num_heads, a.head_dim
        k = len(copies)
        q = torch.stack([x.attn.q(x.attn.latent[0, 0]) for x in copies]).reshape(k, heads, hd) * a.scale
        kv_w = torch.stack([x.attn.kv.weight for x in copies]).reshape(k, 2, heads, hd, c)
        kv_b = torch.stack([x.attn.kv.bias for x in copies]).reshape(k, 2, heads, hd)
        u = torch.einsum("khd,khdc->khc", q, kv_w[:, 0])  # the query folded into the key projection
        bias = torch.einsum("khd,khd->kh", q, kv_b[:, 0])
        logits = _stacked_scores(patches, u, bias)  # (S, L * heads, B, N)
        if mask is not None:
            logits = logits.masked_fill(~mask[:, p:], float("-inf"))
        mixed = softmax_pooled(logits, patches).reshape(groups, -1, k // groups, heads, c)  # (S, B, L, heads, C)
        w_v = kv_w[:, 1].reshape(groups, k // groups, heads, hd, c)
        out = torch.einsum("sblhc,slhdc->sblhd", mixed, w_v).flatten(3)  # (S, B, L, C)
        return _copies_first(out) + kv_b[:, 1].reshape(k, 1, c)

    def pool_reference(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The same pooled features from timm's own forward (slower; kept to check `pool`)."""
        p = self.num_prefix_tokens
        patches = tokens[:, p:]
        if mask is None:
            return self.attn(patches)
        bias = torch.zeros(mask[:, p:].shape, dtype=tokens.dtype).masked_fill(~mask[:, p:], float("-inf"))
        return self.attn(patches, attn_mask=bias[:, None, None, :])


def make_head(name: str, dim: int, num_prefix_tokens: int = 1, has_cls: bool = True,
              grid_size: tuple[int, int] | None = None, **kwargs) -> Aggregator:
    """A pooling head by name (see HEADS); extra keyword arguments go to its class."""
    common = dict(dim=dim, num_prefix_tokens=num_prefix_tokens, has_cls=has_cls)
    classes = {"cls": ClsPool, "mean": MeanPool, "attentive": AttentivePool}
    check_head_options(name, classes.get(name, AbMILP), kwargs)
    if name in classes:
        return classes[name](**common, **kwargs)
    variants = {"abmilp": {}, "abmilp-tanh": dict(depth=1, act="tanh"), "abmilp-relu": dict(depth=1, act="relu"),
                "abmilp-gated": dict(gated=True), "abmilp-sa": dict(self_attention=True),
                "abmilp-pos": dict(pos_embed="sincos", grid_size=grid_size), "abmilp-cls": dict(include_cls=True)}
    if name not in variants:
        raise SelaggError(f"Unknown pooling head {name!r}; choose one of {', '.join(HEADS)}.")
    return AbMILP(**common, **{**variants[name], **kwargs})


def check_head_options(name: str, cls: type, options: dict) -> None:
    """Raise a SelaggError for keyword arguments the head would otherwise drop or fail on deep inside."""
    accepted = [p for p in inspect.signature(cls.__init__).parameters
                if p not in ("self", "dim", "num_prefix_tokens", "has_cls")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SelaggError(f"The {name!r} head takes no option {', '.join(map(repr, unknown))}; it accepts "
                          f"{', '.join(accepted) if accepted else 'none besides dim, num_prefix_tokens and has_cls'}: "
                          "check the spelling or leave the option out.")


def head_for_model(name: str, model: nn.Module, **kwargs) -> Aggregator:
    """A pooling head sized for a timm ViT: its width, prefix tokens, [cls] and patch grid."""
    from .models import has_cls_token, num_prefix_tokens, patch_grid

    return make_head(name, model.embed_dim, num_prefix_tokens(model), has_cls_token(model), patch_grid(model), **kwargs)


def patch_weights(weights: torch.Tensor, num_prefix_tokens: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """The weights of the patch tokens on their grid, (B, rows, cols)."""
    return weights[:, num_prefix_tokens:].reshape(weights.shape[0], *grid_size)


def localisation_score(weights: torch.Tensor, object_masks: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Per image, the share of the patch weights that falls on the object's patches, (B,)."""
    patches = weights[:, num_prefix_tokens:].float()
    masks = object_masks.reshape(len(object_masks), -1).to(patches.device)
    if masks.shape != patches.shape:
        raise SelaggError(f"Object masks cover {masks.shape[1]} patches but the weights cover {patches.shape[1]}; "
                          "use masks on the backbone's patch grid.")
    return (patches * masks).sum(1) / patches.sum(1).clamp_min(1e-12)


def uniform_localisation(object_masks: torch.Tensor) -> torch.Tensor:
    """The localisation score of uniform weights: the share of patches the object covers, (B,)."""
    return object_masks.reshape(len(object_masks), -1).float().mean(1)

