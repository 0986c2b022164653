"""Pooling heads: frozen tokens (B, T, D) in, one vector per image (B, D) and the weight each token got out.

Tokens come as a ViT emits them: prefix tokens first ([cls] at index 0 when the model has one, then
registers), then the patches in raster order. `weights` (B, T) covers *all* input tokens and sums to 1
per image; tokens a head does not pool (registers, and [cls] unless asked for) get 0. An optional
boolean `keep` (B, T) or (B, patches) marks the tokens a head may pool. `make_head` builds a head by
name from a token width and a `models.TokenLayout`; the names are the registry `HEAD_KINDS` (listed at
the end of this docstring). `probing` puts BatchNorm and a linear layer after a head.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, AttentionPoolLatent, build_sincos2d_pos_embed

from .checks import SelaggError, options_object, whole_number, whole_number_fields
from .models import TokenLayout

__all__ = ["AbMILP", "HEADS", "make_head", "patch_weights", "localisation_score", "uniform_localisation"]


class Aggregator(nn.Module):
    """Base class: `forward` checks tokens and `keep`, then `pool` does the work (checks done once, outside)."""

    def __init__(self, dim: int, layout: TokenLayout | None = None):
        super().__init__()
        whole_number(dim, "dim", 1, "pass the backbone's token width (embed_dim), e.g. 768")
        if layout is not None and not isinstance(layout, TokenLayout):
            raise SelaggError(f"A head's layout is a models.TokenLayout, got a {type(layout).__name__}; pass "
                              "models.token_layout(model) or a TokenSet's .layout.")
        self.dim, self.layout = dim, layout  # None: [cls] then the patches, grid unknown
        self.num_prefix_tokens = 1 if layout is None else layout.num_prefix_tokens
        self.has_cls = True if layout is None else layout.has_cls
        self.out_dim = dim

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled (B, D), weights (B, T)) for tokens (B, T, D) and optionally `keep`, the tokens that may be pooled
        ((B, T) or (B, patches) booleans)."""
        tokens, keep = self.check(tokens, keep)
        return self.pool(tokens, keep)

    def check(self, tokens: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validated tokens in the head's dtype and `keep` as (B, T) booleans over all tokens (or None)."""
        tokens = check_tokens(tokens, self.dim, self.num_prefix_tokens)
        ref = next(self.parameters(), None)
        if ref is not None and tokens.dtype != ref.dtype:
            tokens = tokens.to(ref.dtype)
        return tokens, check_keep(keep, tokens, self.num_prefix_tokens)

    def pool(self, tokens: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled, weights) for checked tokens and `keep` over all (B, T) tokens, or None."""
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


def check_keep(keep: torch.Tensor | None, tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor | None:
    """`keep` (True = the token may be pooled) over all T tokens; a (B, patches) one is extended with the prefix kept."""
    if keep is None:
        return None
    b, t, _ = tokens.shape
    n = t - num_prefix_tokens
    if not isinstance(keep, torch.Tensor) or keep.ndim != 2 or keep.shape[0] != b or keep.shape[1] not in (t, n):
        shape = tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise SelaggError(f"The keep mask has shape {shape} but the tokens need ({b}, {t}) over all tokens or "
                          f"({b}, {n}) over patch tokens; True marks a token that may be pooled.")
    if keep.dtype != torch.bool:
        raise SelaggError(f"The keep mask must be boolean (True = may be pooled), got {keep.dtype}; use keep.bool().")
    if keep.shape[1] == n:
        keep = torch.cat([keep.new_ones(b, num_prefix_tokens), keep], dim=1)
    keep = keep.to(tokens.device)
    if not keep[:, num_prefix_tokens:].any(dim=1).all():
        raise SelaggError("The keep mask leaves an image without any patch token to pool; "
                          "keep at least one patch per image.")
    return keep


def _pooled_tokens(head: Aggregator, tokens: torch.Tensor, keep: torch.Tensor | None,
                   include_cls: bool = False) -> torch.Tensor:
    """(B, T) boolean of the tokens pooled: the head's positions and the caller's `keep` together."""
    pooled = head.pooled_positions(tokens.shape[1], include_cls).to(tokens.device).expand(tokens.shape[0], -1)
    return pooled if keep is None else pooled & keep


class ClsPool(Aggregator):
    """The [cls] token itself (the usual linear-probe input)."""

    def __init__(self, dim: int, layout: TokenLayout | None = None):
        super().__init__(dim, layout)
        if not self.has_cls:
            raise SelaggError("This model has no [cls] token, so 'cls' pooling is impossible; "
                              "use 'mean' or 'abmilp' (models such as I-JEPA are probed on mean-pooled patches).")

    def pool(self, tokens, keep):
        weights = torch.zeros(tokens.shape[:2], dtype=tokens.dtype, device=tokens.device)
        weights[:, 0] = 1.0
        return tokens[:, 0], weights


class MeanPool(Aggregator):
    """The plain average of the patch tokens (global average pooling)."""

    def pool(self, tokens, keep):
        pooled = _pooled_tokens(self, tokens, keep).to(tokens.dtype)
        weights = pooled / pooled.sum(dim=1, keepdim=True)
        return torch.einsum("bt,btd->bd", weights, tokens), weights


@dataclass(frozen=True, repr=False)
class ScorerOptions:
    """How AbMILP scores a token: `depth` hidden layers of width `hidden` with `act` ('tanh' or 'relu');
    `gated` (Ilse et al.'s tanh(Vh) * sigmoid(Uh), on at least one hidden layer); `self_attention` (one
    single-head self-attention layer mixes the tokens the scorer reads; the pooled values stay the
    backbone's tokens); `pos_embed` ('sincos': fixed 2-D sin-cos codes added to the patch tokens the scorer reads)."""

    depth: int = 0
    hidden: int = 128
    act: str = "tanh"
    gated: bool = False
    self_attention: bool = False
    pos_embed: str | None = None

    def __post_init__(self) -> None:
        """Refuse a scorer that cannot be built, before any weight is drawn."""
        whole_number_fields(self, {"depth": (0, "use 0 for the paper's single linear scorer"),
                                   "hidden": (1, "pass the width of the scorer's hidden layers, e.g. 128")})
        if self.act not in ("tanh", "relu"):
            raise SelaggError(f"Unknown scorer activation {self.act!r}; choose 'tanh' or 'relu'.")
        if self.pos_embed not in (None, "none", "sincos"):
            raise SelaggError(f"Unknown pos_embed {self.pos_embed!r}; choose None or 'sincos'.")

    def __repr__(self) -> str:
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if getattr(self, f.name) != f.default]
        return f"ScorerOptions({', '.join(changed)})"


class AbMILP(Aggregator):
    """Attention-based MIL pooling: a learned score per token, softmax over tokens, weighted sum.

    The default is the paper's head: patch tokens only, one Linear(D, 1) scorer. `scorer` (a
    `ScorerOptions`) chooses a deeper, gated, self-attending or position-aware scorer;
    `include_cls` lets the [cls] token compete with the patches.
    """

    def __init__(self, dim: int, layout: TokenLayout | None = None, scorer: ScorerOptions | None = None,
                 include_cls: bool = False):
        super().__init__(dim, layout)
        scorer = options_object(scorer, ScorerOptions, "scorer", "ScorerOptions(depth=1, act='relu')", ScorerOptions())
        if include_cls and not self.has_cls:
            raise SelaggError("include_cls=True needs a model with a [cls] token; this one has none.")
        depth = max(scorer.depth, 1) if scorer.gated else scorer.depth  # the gate acts on a hidden layer
        self.scorer, self.include_cls, self.gated = scorer, include_cls, scorer.gated
        self.mix = Attention(dim, num_heads=1, qkv_bias=True) if scorer.self_attention else None
        if self.mix is not None:
            self.mix.fused_attn = False  # plain ops: vmap-friendly and deterministic
        self.pos_embed: torch.Tensor | None
        if scorer.pos_embed in (None, "none"):
            self.register_buffer("pos_embed", None)
        else:
            if layout is None:
                raise SelaggError("pos_embed='sincos' needs the patch grid, but the head was built without a "
                                  "layout; pass the backbone's: make_head(name, dim, models.token_layout(model)) "
                                  "or a TokenSet's .layout.")
            self.register_buffer("pos_embed", build_sincos2d_pos_embed(list(layout.grid_size), dim), persistent=False)
        activation = nn.Tanh if scorer.act == "tanh" else nn.ReLU
        layers: list[nn.Module] = []
        width = dim
        for _ in range(depth - 1 if scorer.gated else depth):
            layers += [nn.Linear(width, scorer.hidden), activation()]
            width = scorer.hidden
        self.body = nn.Sequential(*layers)
        if scorer.gated:
            self.value, self.gate = nn.Linear(width, scorer.hidden), nn.Linear(width, scorer.hidden)
            width = scorer.hidden
        self.score = nn.Linear(width, 1)

    def check(self, tokens: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As Aggregator.check, and the number of patch tokens must fit the grid of the position codes."""
        tokens, keep = super().check(tokens, keep)
        if self.pos_embed is not None and tokens.shape[1] - self.num_prefix_tokens != len(self.pos_embed):
            raise SelaggError(f"Got {tokens.shape[1] - self.num_prefix_tokens} patch tokens but the head's position "
                              f"codes cover a grid of {len(self.pos_embed)} patches; build the head with the "
                              "backbone's layout (models.token_layout(model) or TokenSet.layout).")
        return tokens, keep

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

    def pool(self, tokens, keep):
        weights = masked_softmax(self.scores(tokens), _pooled_tokens(self, tokens, keep, self.include_cls))
        return torch.einsum("bt,btd->bd", weights, tokens), weights


class AttentivePool(Aggregator):
    """Attentive probe: a learned query cross-attends to the patch tokens (timm's AttentionPoolLatent).

    `weights` are the query's attention probabilities averaged over heads. By default the head is
    attention only (no output projection or MLP: the light probe of Psomas et al.); `mlp=True` adds
    timm's projection and residual MLP block, as in V-JEPA's attentive probe. `pool` computes
    timm's forward in a cheaper order (see `attention`); `pool_reference` runs timm's forward itself.
    """

    def __init__(self, dim: int, layout: TokenLayout | None = None, num_heads: int = 4, mlp: bool = False,
                 mlp_ratio: float = 4.0):
        super().__init__(dim, layout)
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

    def pool(self, tokens, keep):
        a, p = self.attn, self.num_prefix_tokens
        patches = tokens[:, p:]
        b, n, c = patches.shape
        pooled = torch.ones((b, n), dtype=torch.bool, device=tokens.device) if keep is None else keep[:, p:]
        attn = self.attention(patches, pooled)  # (B, heads, N)
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

    def pool_reference(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The same pooled features from timm's own forward (slower; kept to check `pool`)."""
        p = self.num_prefix_tokens
        patches = tokens[:, p:]
        if keep is None:
            return self.attn(patches)
        bias = torch.zeros(keep[:, p:].shape, dtype=tokens.dtype).masked_fill(~keep[:, p:], float("-inf"))
        return self.attn(patches, attn_mask=bias[:, None, None, :])


# ----------------------------------------------------------------------------- the heads by name
@dataclass(frozen=True)
class HeadKind:
    """One registered head: its class, the options its name stands for, and one line for the docs."""

    cls: type[Aggregator]
    options: dict = field(default_factory=dict)
    summary: str = ""


#: Every head `make_head` builds, by name; errors and the module's docs read their lists from here.
HEAD_KINDS: dict[str, HeadKind] = {
    "cls": HeadKind(ClsPool, {}, "the [cls] token itself (the usual linear probe)"),
    "mean": HeadKind(MeanPool, {}, "the average of the patch tokens"),
    "abmilp": HeadKind(AbMILP, {}, "one linear score per patch token, softmax, weighted sum (the paper's head)"),
    "abmilp-tanh": HeadKind(AbMILP, dict(scorer=ScorerOptions(depth=1, act="tanh")),
                            "scores through a tanh hidden layer"),
    "abmilp-relu": HeadKind(AbMILP, dict(scorer=ScorerOptions(depth=1, act="relu")),
                            "scores through a ReLU hidden layer"),
    "abmilp-gated": HeadKind(AbMILP, dict(scorer=ScorerOptions(gated=True)), "Ilse et al.'s gated scorer"),
    "abmilp-sa": HeadKind(AbMILP, dict(scorer=ScorerOptions(self_attention=True)),
                          "scores tokens mixed by one self-attention layer"),
    "abmilp-pos": HeadKind(AbMILP, dict(scorer=ScorerOptions(pos_embed="sincos")),
                           "2-D sin-cos position codes added to the scorer input"),
    "abmilp-cls": HeadKind(AbMILP, dict(include_cls=True), "[cls] competes with the patches"),
    "attentive": HeadKind(AttentivePool, {}, "a learned query attends to the patches (timm's AttentionPoolLatent)"),
}
HEADS = tuple(HEAD_KINDS)


def describe_heads() -> str:
    """One line per registered head: its name, class and options, and what it pools."""
    return "\n".join(f"- {name}: {kind.cls.__name__}"
                     f"{'(' + ', '.join(f'{k}={v!r}' for k, v in kind.options.items()) + ')' if kind.options else ''}"
                     f": {kind.summary}" for name, kind in HEAD_KINDS.items())


__doc__ += "\nThe registered heads (`HEAD_KINDS`):\n\n" + describe_heads() + "\n"


def make_head(name: str, dim: int, layout: TokenLayout | None = None, **options) -> Aggregator:
    """A pooling head by name (see HEAD_KINDS) for tokens of width `dim` laid out as `layout` (None: [cls] then
    the patches, no grid); extra keyword arguments go to its class."""
    if name not in HEAD_KINDS:
        raise SelaggError(f"Unknown pooling head {name!r}; choose one of {', '.join(HEAD_KINDS)}.")
    kind = HEAD_KINDS[name]
    check_head_options(name, kind.cls, options)
    return kind.cls(dim, layout, **{**kind.options, **options})


def check_head_options(name: str, cls: type, options: dict) -> None:
    """Raise a SelaggError for keyword arguments the head would otherwise drop or fail on deep inside."""
    accepted = [p for p in inspect.signature(cls.__init__).parameters
                if p not in ("self", "dim", "layout")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SelaggError(f"The {name!r} head takes no option {', '.join(map(repr, unknown))}; it accepts "
                          f"{', '.join(accepted) if accepted else 'none besides dim and layout'}: "
                          "check the spelling or leave the option out.")


# ----------------------------------------------------------------------------- where the weights fall
def patch_weights(weights: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """The weights of the patch tokens on their grid, (B, rows, cols)."""
    return weights[:, layout.num_prefix_tokens:].reshape(weights.shape[0], *layout.grid_size)


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
