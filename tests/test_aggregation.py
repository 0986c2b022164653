"""Pooling heads: one interface, weights that sum to 1 on the pooled tokens, clear errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selagg_utils import SelaggError
from selagg_utils.aggregation import (HEADS, AbMILP, check_mask, head_for_model, localisation_score, make_head,
                                      masked_softmax, negligible_grad_dropped, softmax_pooled, uniform_localisation)
from selagg_utils.models import tiny_vit
from selagg_utils.probing import ProbeHead, ProbeStack

D = 32


def tokens(b=3, prefix=1, grid=(4, 4), seed=0):
    return torch.randn(b, prefix + grid[0] * grid[1], D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", HEADS)
def test_every_head_pools_to_b_by_d_with_weights_summing_to_one(name):
    head = make_head(name, D, 1, True, (4, 4), **({"num_heads": 2} if name == "attentive" else {}))
    pooled, weights = head(tokens())
    assert pooled.shape == (3, D) and weights.shape == (3, 17)
    assert torch.allclose(weights.sum(1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("name", [h for h in HEADS if h not in ("cls", "abmilp-cls")])
def test_registers_and_cls_get_no_weight_by_default(name):
    head = make_head(name, D, 5, True, (4, 4), **({"num_heads": 2} if name == "attentive" else {}))
    _, weights = head(tokens(prefix=5))
    assert torch.all(weights[:, :5] == 0)


def test_abmilp_matches_its_definition():
    head = AbMILP(D, 1, True)
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
    mask = torch.rand(3, 16, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[:, 0] = True
    assert torch.allclose(head(x)[0], head.pool_reference(x), atol=1e-5)
    assert torch.allclose(head(x, mask)[0], head.pool_reference(x, check_mask(mask, x, 1)), atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 4), prefix=st.integers(1, 3), seed=st.integers(0, 1000),
       name=st.sampled_from(["mean", "abmilp", "abmilp-gated", "attentive"]))
def test_masked_tokens_get_zero_weight(b, prefix, seed, name):
    x = tokens(b, prefix, seed=seed)
    mask = torch.rand(b, 16, generator=torch.Generator().manual_seed(seed)) > 0.5
    mask[:, seed % 16] = True
    head = make_head(name, D, prefix, True, (4, 4), **({"num_heads": 2} if name == "attentive" else {}))
    _, weights = head(x, mask)
    assert torch.all(weights[:, prefix:][~mask] == 0)
    assert torch.allclose(weights.sum(1), torch.ones(b), atol=1e-5)


def distinct_copies(name: str, groups: int) -> tuple[ProbeStack, torch.Tensor]:
    """Six copies of a head with different parameters in `groups` groups, and a token batch per group."""
    extra = {"num_heads": 2} if name == "attentive" else {}
    stack = ProbeStack.copies(ProbeHead(make_head(name, D, grid_size=(4, 4), **extra), 5), 6)
    stack.groups = groups
    with torch.no_grad():
        for k, h in enumerate(stack.heads):
            for p in h.pool.parameters():
                p.add_(0.1 * k)
    return stack, torch.stack([tokens(seed=s) for s in range(groups)]) if groups > 1 else tokens()


@pytest.mark.parametrize("name", ["mean", "abmilp", "abmilp-relu", "abmilp-gated", "abmilp-pos", "abmilp-sa",
                                  "attentive"])
@pytest.mark.parametrize("groups", [1, 3])
def test_stacked_copies_equal_separate_heads(name, groups):
    stack, x = distinct_copies(name, groups)
    per = 6 // groups
    expected = torch.stack([h.pool(x[k // per] if groups > 1 else x)[0] for k, h in enumerate(stack.heads)])
    assert torch.allclose(stack.pooled(x), expected, atol=1e-4)


@pytest.mark.parametrize("name", ["abmilp", "abmilp-cls", "abmilp-gated", "attentive"])
@pytest.mark.parametrize("groups", [1, 3])
def test_stacked_copies_have_the_gradients_of_separate_heads(name, groups):
    stack, x = distinct_copies(name, groups)
    mask = None if groups > 1 else torch.rand(3, 17, generator=torch.Generator().manual_seed(2)) > 0.3
    if mask is not None:
        mask[:, :2] = True
    target = torch.randn(6, 3, D, generator=torch.Generator().manual_seed(3))
    (stack.pooled(x, mask) * target).sum().backward()
    stacked = [[p.grad.clone() for p in h.pool.parameters()] for h in stack.heads]
    per = 6 // groups
    for k, h in enumerate(stack.heads):
        h.zero_grad()
        (h.pool(x[k // per] if groups > 1 else x, mask)[0] * target[k]).sum().backward()
        for got, p in zip(stacked[k], h.pool.parameters()):
            assert torch.allclose(got, p.grad, atol=1e-4, rtol=1e-4)


def test_softmax_pooled_is_softmax_then_weighted_sum_with_its_gradients():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g).requires_grad_()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.allclose(softmax_pooled(scores, x), scores.softmax(-1).transpose(1, 2) @ x)
    assert torch.autograd.gradcheck(softmax_pooled, (scores, x))


@pytest.mark.parametrize("name", ["abmilp", "attentive"])
def test_stacked_copies_train_under_bf16_autocast(name):
    extra = {"num_heads": 2} if name == "attentive" else {}
    stack = ProbeStack.copies(ProbeHead(make_head(name, D, **extra), 5), 3)
    x = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = stack.pooled(x)
    pooled.float().square().sum().backward()
    matrices = [p for p in stack.heads[0].pool.parameters() if p.ndim > 1]  # a score bias has no gradient
    grads = [p.grad.clone() for p in matrices]
    stack.zero_grad()
    stack.pooled(x).square().sum().backward()
    for low, full in zip(grads, matrices):
        assert low.dtype == full.dtype and torch.allclose(low, full.grad, rtol=0.1, atol=0.05 * full.grad.abs().max())


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


def test_attentive_with_mlp_is_stacked_one_by_one():
    stack = ProbeStack.copies(ProbeHead(make_head("attentive", D, num_heads=2, mlp=True), 5), 2)
    x = tokens()
    assert torch.allclose(stack.pooled(x), torch.stack([h.pool(x)[0] for h in stack.heads]), atol=1e-5)


def test_head_for_model_reads_prefix_and_grid():
    head = head_for_model("abmilp-pos", tiny_vit())
    assert (head.dim, head.num_prefix_tokens, head.has_cls) == (128, 1, True)


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


def test_mask_that_does_not_match_raises():
    with pytest.raises(SelaggError, match="mask has shape"):
        make_head("mean", D)(tokens(), torch.ones(3, 10, dtype=torch.bool))
    with pytest.raises(SelaggError, match="boolean"):
        make_head("mean", D)(tokens(), torch.ones(3, 16))
    with pytest.raises(SelaggError, match="without any patch"):
        make_head("mean", D)(tokens(), torch.zeros(3, 16, dtype=torch.bool))


def test_cls_on_model_without_cls_raises():
    with pytest.raises(SelaggError, match="no \\[cls\\] token"):
        make_head("cls", D, num_prefix_tokens=0, has_cls=False)
    with pytest.raises(SelaggError, match="no \\[cls\\] token"):
        head_for_model("cls", tiny_vit(class_token=False, global_pool="avg"))


def test_unknown_head_raises():
    with pytest.raises(SelaggError, match="Unknown pooling head"):
        make_head("max", D)
