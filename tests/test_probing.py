"""Probes: the lr sweep trains copies together and equals separate runs; low-shot; k-NN; determinism."""
import re
from dataclasses import replace

import pytest
import torch
from timm.optim import Lars

from selagg_utils import SelaggError
from selagg_utils.features import TokenSet
from selagg_utils.models import TokenLayout, tiny_vit
from selagg_utils.probing import (
    LowShot,
    ProbeHead,
    ProbeRecipe,
    fmt,
    low_shot_accuracy,
    low_shot_indices,
    probe_head,
    train_probe,
    train_probes,
)
from selagg_utils.sweep.optimizers import SweepAdamW, SweepLars
from selagg_utils.sweep.stacks import ProbeStack

D, C = 16, 3


def toy(n, seed):
    """Tokens where the class is written into one random patch out of 9 (cls is noise)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % C
    x = torch.randn(n, 10, D, generator=g) * 0.5
    where = torch.randint(1, 10, (n,), generator=g)
    x[torch.arange(n), where, :C] += 3 * torch.nn.functional.one_hot(labels, C).float()
    x[torch.arange(n), where, C] += 3.0  # a flag an attention head can find
    return TokenSet(x.half(), labels, TokenLayout(True, 0, (3, 3)), {"toy": seed})


FAST = ProbeRecipe(epochs=30, warmup_epochs=3, batch_size=64, lrs=(0.1, 1.0, 10.0))


def test_abmilp_finds_the_informative_patch_and_beats_cls():
    train, val, test = toy(384, 0), toy(192, 1), toy(192, 2)
    ab = train_probe("abmilp", train, val, test, FAST, seed=0)
    cls = train_probe("cls", train, val, test, FAST, seed=0)
    assert ab.test > 0.9 and cls.test < 0.6
    assert ab.best_lr in FAST.lrs and len(ab.val_by_lr) == 3


def test_training_is_deterministic_for_a_seed():
    train, val = toy(128, 0), toy(64, 1)
    a = train_probe("abmilp", train, val, recipe=FAST, seed=3)
    b = train_probe("abmilp", train, val, recipe=FAST, seed=3)
    assert a.val_by_lr == b.val_by_lr and a.losses == b.losses


@pytest.mark.parametrize("optimizer", ["lars", "adamw"])
def test_copies_trained_together_equal_runs_trained_alone(optimizer):
    train, val = toy(128, 0), toy(64, 1)
    recipe = ProbeRecipe(epochs=4, warmup_epochs=1, batch_size=32, lrs=(0.3, 3.0), optimizer=optimizer)
    together = train_probe("abmilp", train, val, recipe=recipe, seed=0).val_by_lr
    alone = [train_probe("abmilp", train, val, recipe=ProbeRecipe(**{**recipe.__dict__, "lrs": (lr,)}),
                         seed=0).val_by_lr[0] for lr in recipe.lrs]
    assert together == pytest.approx(alone, abs=1e-6)


@pytest.mark.parametrize("head", ["cls", "abmilp", "attentive"])
def test_seeds_trained_together_equal_seeds_trained_alone(head):
    train, val = toy(128, 0), toy(64, 1)
    recipe = ProbeRecipe(epochs=3, warmup_epochs=1, batch_size=32, lrs=(0.3, 3.0))
    kw = {"num_heads": 2} if head == "attentive" else {}
    together = [r.val_by_lr for r in train_probes(head, train, val, recipe=recipe, seeds=(0, 5), **kw)]
    alone = [train_probe(head, train, val, recipe=recipe, seed=s, **kw).val_by_lr for s in (0, 5)]
    assert sum(together, []) == pytest.approx(sum(alone, []), abs=1e-6)
    assert together[0] != together[1]


@pytest.mark.parametrize("options", [{"always_adapt": True}, {"weight_decay": 0.05},
                                     {"always_adapt": True, "nesterov": True},
                                     {"weight_decay": 0.05, "trust_clip": True},
                                     {"momentum": 0.0, "always_adapt": True}])
def test_sweep_lars_steps_like_timm_lars(options):
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (4,), (2, 5), (2,)]
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)]
    start[1].zero_()  # a zero weight norm: ratio 1, as in timm
    settings = {"momentum": 0.9, **options}

    def run(optimizer_class):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        groups = [{"params": params[:2], "lr": 0.3}, {"params": params[2:3], "lr": 3.0},
                  {"params": params[3:], "lr": 0.03, "weight_decay": 0.0, "always_adapt": False}]
        optimizer = optimizer_class(groups, **settings)
        for step in grads:
            for p, grad in zip(params, step):
                p.grad = grad.clone()
            optimizer.step()
        return params

    for ours, timm_lars in zip(run(SweepLars), run(Lars)):
        assert torch.allclose(ours, timm_lars, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_sweep_adamw_steps_like_torch_adamw(weight_decay):
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (4,), (2, 5)]
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(5)]

    def run(optimizer_class):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        groups = [{"params": params[:1], "lr": 0.3}, {"params": params[1:2], "lr": 0.01},
                  {"params": params[2:], "lr": 0.03, "betas": (0.8, 0.99)}]
        optimizer = optimizer_class(groups, lr=0.1, weight_decay=weight_decay)
        for step in grads:
            for p, grad in zip(params, step):
                p.grad = grad.clone()
            optimizer.step()
        return params, optimizer

    (ours, sweep), (theirs, torch_adamw) = run(SweepAdamW), run(torch.optim.AdamW)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert sweep.state[ours[0]]["step"] == torch_adamw.state[theirs[0]]["step"] == 5


def test_stack_eval_equals_each_head():
    train = toy(64, 0)
    stack = ProbeStack.copies(probe_head("abmilp", train, C, 0), 2)
    stack.train()
    stack(train.tokens.float())  # one step of running statistics
    stack.eval()
    logits = stack(train.tokens.float())
    for k, head in enumerate(stack.heads):
        assert torch.allclose(logits[k], head.eval()(train.tokens.float()), atol=1e-5)


def test_probe_head_is_mae_probe():
    head = probe_head("cls", toy(8, 0), C, 0)
    assert isinstance(head, ProbeHead) and not head.bn.affine and head.linear.weight.std() < 0.02


def test_a_probe_head_depends_on_its_seed_only_and_reads_a_model_or_a_token_set():
    torch.manual_seed(123)
    a = probe_head("abmilp", toy(8, 0), C, seed=7)
    b = probe_head("abmilp", toy(8, 0), C, seed=7)
    c = probe_head("abmilp", toy(8, 0), C, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.linear.weight, c.linear.weight)
    from_model = probe_head("abmilp-pos", tiny_vit(), 10)
    assert from_model.pool.dim == 128 and len(from_model.pool.pos_embed) == 64 and from_model.linear.out_features == 10


def test_low_shot_indices():
    labels = torch.arange(30) % 3
    draws = low_shot_indices(labels, 5, draws=3, seed=0)
    assert all(torch.bincount(labels[d]).tolist() == [5, 5, 5] for d in draws)
    assert not torch.equal(draws[0], draws[1])
    assert all(torch.equal(a, b) for a, b in zip(draws, low_shot_indices(labels, 5, draws=3, seed=0)))


def test_low_shot_asking_too_many_raises():
    with pytest.raises(SelaggError, match="only 10"):
        low_shot_indices(torch.arange(30) % 3, 11)


def test_low_shot_accuracy_runs():
    train, val, test = toy(96, 0), toy(48, 1), toy(48, 2)
    accs = low_shot_accuracy("abmilp", train, val, test, LowShot(shots=5, draws=2, seed=4, min_steps=40), FAST)
    assert len(accs) == 2 and all(0 <= a <= 1 for a in accs)
    assert "±" in fmt(accs)
    draw = low_shot_indices(train.labels, 5, 2, seed=4)[1]  # the second draw trains with seed 4 + 1, 40 steps
    alone = train_probe("abmilp", train.subset(draw), val, test, replace(FAST, min_steps=40), seed=5)
    assert accs[1] == alone.test and len(alone.losses) == 40  # not 30 epochs of 1 step


@pytest.mark.parametrize("bad, words", [(dict(shots=0), "shots=0"), (dict(shots=5, draws=1.5), "draws=1.5"),
                                        (dict(shots=5, seed=-1), "seed=-1"), (dict(shots=5, min_steps=-1), "min_steps"),
                                        (dict(shots=True), "shots=True")])
def test_low_shot_plans_that_cannot_run_are_refused(bad, words):
    with pytest.raises(SelaggError, match=re.escape(words)):
        LowShot(**bad)
    with pytest.raises(SelaggError, match="LowShot"):
        low_shot_accuracy("cls", toy(32, 0), toy(16, 1), toy(16, 2), 5)


def test_unknown_optimizer_raises():
    with pytest.raises(SelaggError, match="Unknown optimizer"):
        train_probe("cls", toy(32, 0), toy(32, 1), recipe=ProbeRecipe(optimizer="sgd", epochs=1, lrs=(1.0,)))
