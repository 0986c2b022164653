"""Pooling heads: one interface, weights that sum to 1 on the pooled tokens, clear errors."""
from dataclasses import fields

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selagg_utils import SelaggError, heads
from selagg_utils.features import TokenSet
from selagg_utils.heads import (
    HEAD_KINDS,
    HEADS,
    AbMILP,
    ScorerOptions,
    check_keep,
    describe_heads,
    localisation_score,
    make_head,
    masked_softmax,
    negligible_grad_dropped,
    patch_weights,
    uniform_localisation,
)
from selagg_utils.models import TokenLayout, tiny_vit, token_layout
from selagg_utils.probing import head_inputs

D = 32


def tokens(b=3, prefix=1, grid=(4, 4), seed=0):
    return torch.randn(b, prefix + grid[0] * grid[1], D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", HEADS)
def test_every_head_pools_to_b_by_d_with_weights_summing_to_one(name):
    head = make_head(name, D, TokenLayout(True, 0, (4, 4)), **({"num_heads": 2} if name == "attentive" else {}))
    pooled, weights = head(tokens())
    assert pooled.shape == (3, D) and weights.shape == (3, 17)
    assert torch.allclose(weights.sum(1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("name", [h for h in HEADS if h not in ("cls", "abmilp-cls")])
def test_registers_and_cls_get_no_weight_by_default(name):
    head = make_head(name, D, TokenLayout(True, 4, (4, 4)), **({"num_heads": 2} if name == "attentive" else {}))
    _, weights = head(tokens(prefix=5))
    assert torch.all(weights[:, :5] == 0)


def test_abmilp_matches_its_definition():
    head = AbMILP(D)
    x = tokens()
    scores = head.score(x[:, 1:]).squeeze(-1)
    expected = (scores.softmax(1)[..., None] * x[:, 1:]).sum(1)
    assert torch.allclose(head(x)[0], expected, atol=1e-6)


def test_include_cls_lets_cls_compete():
    _, weights = make_head("abmilp-cls", D)(tokens())
    assert torch.all(weights[:, 0] > 0)


def test_cls_and_mean():
    x = tokens()
    assert torch.equal(make_head("cls", D)(x)[0], x[:, 0])
    assert torch.allclose(make_head("mean", D)(x)[0], x[:, 1:].mean(1), atol=1e-6)


def test_attentive_equals_timm_forward_with_and_without_mask():
    head = make_head("attentive", D, num_heads=4)
    x = tokens()
    keep = torch.rand(3, 16, generator=torch.Generator().manual_seed(1)) > 0.4
    keep[:, 0] = True
    assert torch.allclose(head(x)[0], head.pool_reference(x), atol=1e-5)
    assert torch.allclose(head(x, keep)[0], head.pool_reference(x, check_keep(keep, x, 1)), atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 4), prefix=st.integers(1, 3), seed=st.integers(0, 1000),
       name=st.sampled_from(["mean", "abmilp", "abmilp-gated", "attentive"]))
def test_tokens_left_out_of_keep_get_zero_weight(b, prefix, seed, name):
    x = tokens(b, prefix, seed=seed)
    keep = torch.rand(b, 16, generator=torch.Generator().manual_seed(seed)) > 0.5
    keep[:, seed % 16] = True
    head = make_head(name, D, TokenLayout(True, prefix - 1, (4, 4)), **({"num_heads": 2} if name == "attentive" else {}))
    _, weights = head(x, keep)
    assert torch.all(weights[:, prefix:][~keep] == 0)
    assert torch.allclose(weights.sum(1), torch.ones(b), atol=1e-5)


def test_negligible_weights_and_gradients_become_exact_zeros():
    scores = torch.tensor([[0.0, -60.0, -85.0, -100.0]])  # e^-60 ~ 9e-27; e^-85 ~ 1e-37; e^-100, a denormal
    weights = masked_softmax(scores, torch.ones(1, 4, dtype=torch.bool))[0]
    assert weights[1] > 0 and weights[2] == 0 and weights[3] == 0 and weights.sum() == 1
    x = torch.tensor([1.0, 1e-35, -1e-40, 2.0], requires_grad=True)
    y = negligible_grad_dropped(x)
    assert torch.equal(y, x)
    y.backward(torch.tensor([1e-3, 1e-31, -1e-39, -5.0]))
    assert x.grad.tolist() == pytest.approx([1e-3, 0.0, 0.0, -5.0])
    assert x.grad[1] == 0 and x.grad[2] == 0


def test_heads_are_built_from_the_layout_of_a_model_or_a_token_set():
    head = make_head("abmilp-pos", 128, token_layout(tiny_vit()))
    assert (head.dim, head.num_prefix_tokens, head.has_cls, len(head.pos_embed)) == (128, 1, True, 64)
    ts = TokenSet(tokens(prefix=5).half(), torch.arange(3), TokenLayout(True, 4, (4, 4)))
    assert head_inputs(ts) == (D, TokenLayout(True, 4, (4, 4)))
    assert head_inputs(tiny_vit()) == (128, TokenLayout(True, 0, (8, 8)))
    weights = make_head("mean", D, ts.layout)(ts.tokens.float())[1]
    assert torch.equal(patch_weights(weights, ts.layout), torch.full((3, 4, 4), 1 / 16))
    with pytest.raises(SelaggError, match="TokenSet or a timm ViT"):
        head_inputs(torch.zeros(3, 17, D))
    with pytest.raises(SelaggError, match="layout is a models.TokenLayout"):
        make_head("mean", D, (1, True, (4, 4)))


def abmilp_options(head: AbMILP) -> dict:
    """The options an AbMILP head was built with, read back from its modules and buffers."""
    activations = [m for m in head.body if not isinstance(m, torch.nn.Linear)]
    return {"depth": len(activations) + int(head.gated),
            "act": "relu" if any(isinstance(m, torch.nn.ReLU) for m in activations) else "tanh",
            "gated": head.gated, "self_attention": head.mix is not None,
            "pos_embed": None if head.pos_embed is None else "sincos", "include_cls": head.include_cls}


@pytest.mark.parametrize("name", HEADS)
def test_make_head_builds_what_the_registry_says(name):
    kind = HEAD_KINDS[name]
    head = make_head(name, D, TokenLayout(True, 0, (4, 4)), **({"num_heads": 2} if name == "attentive" else {}))
    assert type(head) is kind.cls
    if kind.cls is AbMILP:
        built, asked = abmilp_options(head), dict(kind.options)
        scorer = asked.pop("scorer", ScorerOptions())
        asked.update({f.name: getattr(scorer, f.name) for f in fields(scorer) if getattr(scorer, f.name) != f.default})
        assert {k: built[k] for k in asked} == asked
    assert f"- {name}: {kind.cls.__name__}" in describe_heads() and f"- {name}: " in heads.__doc__


def test_a_head_added_to_the_registry_is_built_listed_and_offered_by_the_errors(monkeypatch):
    monkeypatch.setitem(HEAD_KINDS, "abmilp-deep", heads.HeadKind(AbMILP, dict(scorer=ScorerOptions(depth=3)),
                                                                    "three hidden layers"))
    assert len(make_head("abmilp-deep", D).body) == 6
    assert "- abmilp-deep: AbMILP(scorer=ScorerOptions(depth=3)): three hidden layers" in describe_heads()
    with pytest.raises(SelaggError, match="abmilp-deep"):
        make_head("max", D)


def test_localisation_score():
    w = torch.zeros(1, 17)
    w[0, 1:5] = 0.25
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, 0, :2] = True
    assert localisation_score(w, masks, 1).item() == pytest.approx(0.5)
    assert uniform_localisation(masks).item() == pytest.approx(2 / 16)


# --- errors a reader can cause -------------------------------------------------------------------
def test_wrong_shape_raises():
    with pytest.raises(SelaggError, match="batch, tokens, dim"):
        make_head("mean", D)(torch.randn(3, D))
    with pytest.raises(SelaggError, match="width"):
        make_head("abmilp", D)(torch.randn(3, 17, D + 1))


def test_wrong_dtype_raises():
    with pytest.raises(SelaggError, match="floating point"):
        make_head("abmilp", D)(torch.ones(3, 17, D, dtype=torch.int64))


def test_half_tokens_are_accepted():
    pooled, _ = make_head("abmilp", D)(tokens().half())
    assert pooled.dtype == torch.float32


def test_keep_mask_that_does_not_match_raises():
    with pytest.raises(SelaggError, match="keep mask has shape"):
        make_head("mean", D)(tokens(), torch.ones(3, 10, dtype=torch.bool))
    with pytest.raises(SelaggError, match="boolean"):
        make_head("mean", D)(tokens(), torch.ones(3, 16))
    with pytest.raises(SelaggError, match="without any patch"):
        make_head("mean", D)(tokens(), torch.zeros(3, 16, dtype=torch.bool))


def test_cls_on_model_without_cls_raises():
    with pytest.raises(SelaggError, match="no \\[cls\\] token"):
        make_head("cls", D, TokenLayout(False, 0, (4, 4)))
    with pytest.raises(SelaggError, match="no \\[cls\\] token"):
        make_head("cls", 128, token_layout(tiny_vit(class_token=False, global_pool="avg")))


def test_unknown_head_raises_listing_every_registered_head():
    with pytest.raises(SelaggError, match="Unknown pooling head") as error:
        make_head("max", D)
    assert all(name in str(error.value) for name in HEAD_KINDS)
