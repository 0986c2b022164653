"""Stacked copies: K probe heads computed together equal the same heads computed one by one."""
import copy

import pytest
import torch

from selagg_utils import SelaggError
from selagg_utils.features import TokenSet
from selagg_utils.heads import make_head
from selagg_utils.models import TokenLayout
from selagg_utils.probing import ProbeHead, probe_head
from selagg_utils.sweep.stacks import ProbeStack, can_stack, softmax_pooled, stack_accuracy, training_source

D = 32


def tokens(b=3, prefix=1, grid=(4, 4), seed=0):
    return torch.randn(b, prefix + grid[0] * grid[1], D, generator=torch.Generator().manual_seed(seed))


def distinct_copies(name: str, groups: int) -> tuple[ProbeStack, torch.Tensor]:
    """Six copies of a head with different parameters in `groups` groups, and a token batch per group."""
    extra = {"num_heads": 2} if name == "attentive" else {}
    head = ProbeHead(make_head(name, D, TokenLayout(True, 0, (4, 4)), **extra), 5)
    stack = ProbeStack([copy.deepcopy(head) for _ in range(6)], groups=groups)
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


def test_attentive_with_mlp_is_stacked_one_by_one():
    stack = ProbeStack.copies(ProbeHead(make_head("attentive", D, num_heads=2, mlp=True), 5), 2)
    x = tokens()
    assert torch.allclose(stack.pooled(x), torch.stack([h.pool(x)[0] for h in stack.heads]), atol=1e-5)


@pytest.mark.parametrize("name, stackable", [("abmilp", True), ("abmilp-gated", True), ("abmilp-sa", False),
                                             ("attentive", True), ("cls", False), ("mean", False)])
def test_which_heads_are_stacked_in_one_call(name, stackable):
    assert can_stack(make_head(name, D, **({"num_heads": 2} if name == "attentive" else {}))) == stackable
    assert not can_stack(make_head("attentive", D, num_heads=2, mlp=True))


def test_shared_pooled_features_train_like_separate_heads():
    train = TokenSet(tokens(64).half(), torch.arange(64) % 3, TokenLayout(True, 0, (4, 4)))
    heads = [probe_head("cls", train, 3, seed) for seed in (0, 1, 2, 3)]
    with torch.no_grad():
        heads[1].bn.running_mean.add_(0.5)  # copies need not share their running statistics
    stack = ProbeStack(copy.deepcopy(heads), groups=2, prepooled=True)
    stack.train()
    z = torch.randn(2, 64, D, generator=torch.Generator().manual_seed(4))  # one batch per group
    logits = stack(z)
    for k, (ours, alone) in enumerate(zip(stack.heads, heads)):
        alone.train()
        assert torch.allclose(logits[k], alone.linear(alone.bn(z[k // 2])), atol=1e-5)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.allclose(getattr(ours.bn, name).float(), getattr(alone.bn, name).float(), atol=1e-6)


def test_a_stack_reads_pooled_features_only_when_asked_and_only_for_heads_that_learn_nothing():
    train = TokenSet(tokens(16).half(), torch.arange(16) % 3, TokenLayout(True, 0, (4, 4)))
    cls = ProbeStack.copies(probe_head("cls", train, 3), 2)
    assert not cls.prepooled and not cls.learns_pooling
    batches = training_source(cls, train, "cpu")
    assert cls.prepooled and batches(torch.arange(4)).shape == (4, D)  # pooled once: (B, D), not tokens
    assert stack_accuracy(cls.reading_pooled(False), train.tokens, train.labels) == pytest.approx(
        [probe_head("cls", train, 3).eval()(train.tokens.float()).argmax(1).eq(train.labels).float().mean().item()] * 2)
    abmilp = ProbeStack.copies(probe_head("abmilp", train, 3), 2)
    assert abmilp.learns_pooling and training_source(abmilp, train, "cpu")(torch.arange(4)).shape == (4, 17, D)
    assert not abmilp.prepooled
    with pytest.raises(SelaggError, match="learn nothing"):
        abmilp.reading_pooled(True)
    with pytest.raises(SelaggError, match="learn nothing"):
        ProbeStack([probe_head("abmilp", train, 3)], prepooled=True)
