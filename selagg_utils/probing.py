"""Probe heads trained on cached tokens: the recipe, the training loop, low-shot, and the summaries of a sweep.

`train_probe` follows MAE's linear-probing protocol (BatchNorm without affine, then Linear; LARS or
AdamW; linear warm-up then cosine) and trains one copy of the head per learning rate *together*:
every batch is read once and all copies are computed in one batched call (`sweep.stacks.ProbeStack`),
each copy with its own learning rate in its own optimizer parameter groups, all updated in one
multi-tensor step (`sweep.optimizers`). The learning rate is chosen on the val split and the chosen head is
reported on the test split. `train_probes` adds seeds the same way, each with its own batches.
Evaluations without a training loop (k-NN, logistic regression, least squares) are in `linear_eval`.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import Lars
from timm.scheduler import CosineLRScheduler

from .checks import (
    SelaggError,
    first_nonfinite_item,
    notice,
    options_object,
    real_number,
    sequence_of,
    whole_number,
    whole_number_fields,
)
from .config import resolve_device
from .features import TokenSet, check_same_source
from .heads import HEAD_KINDS, Aggregator, make_head
from .models import TokenLayout, token_layout

__all__ = ["ProbeRecipe", "ProbeHead", "ProbeResult", "probe_head", "train_probes", "train_probe", "train_one_probe",
           "checked_seeds", "probe_accuracy",
           "head_weights", "LowShot", "low_shot_indices", "low_shot_accuracy", "summarise", "fmt"]


# ----------------------------------------------------------------------------- the recipe and the probe head
MAX_LR = 1e6  # far beyond any probe's useful range, and safely inside float32 once scaled by the batch size


@dataclass(frozen=True)
class ProbeRecipe:
    """How probe heads are trained; base learning rates are scaled by batch_size / 256 as in MAE."""

    epochs: int = 90
    warmup_epochs: int = 10
    batch_size: int = 256
    optimizer: str = "lars"
    lrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
    weight_decay: float = 0.0
    momentum: float = 0.9
    min_steps: int = 0

    def __post_init__(self) -> None:
        """Refuse a recipe that would train nothing, diverge on purpose or report an untrained head."""
        if self.optimizer not in ("lars", "adamw"):
            raise SelaggError(f"Unknown optimizer {self.optimizer!r}; choose 'lars' (MAE's protocol) or 'adamw'.")
        whole_number(self.epochs, "epochs", 1, "a probe must train for at least one epoch (MAE's protocol uses 90)")
        real_number(self.warmup_epochs, "warmup_epochs", 0, "use 0 for no warm-up (MAE's protocol uses 10)")
        if self.warmup_epochs > self.epochs:
            raise SelaggError(f"warmup_epochs={self.warmup_epochs} is longer than epochs={self.epochs}; the warm-up "
                              "is part of the training, so choose at most as many warm-up epochs as epochs.")
        whole_number(self.batch_size, "batch_size", 2, "BatchNorm needs at least 2 images per batch (MAE uses 256)")
        if isinstance(self.lrs, (str, bytes)) or not hasattr(self.lrs, "__iter__") \
                or len(sequence_of(self.lrs, "lrs", "(0.1, 1.0, 10.0)")) == 0:
            raise SelaggError(f"lrs={self.lrs!r} is not accepted: it must be a non-empty sequence of learning rates, "
                              "e.g. lrs=(0.1, 1.0, 10.0).")
        object.__setattr__(self, "lrs", sequence_of(self.lrs, "lrs", "(0.1, 1.0, 10.0)"))
        for lr in self.lrs:
            try:
                real_number(lr, "lr", 0, "", strictly=True, maximum=MAX_LR)
            except SelaggError:
                raise SelaggError(f"The learning rate {lr!r} in lrs is not accepted: every rate must be a finite "
                                  f"number greater than 0 (a negative one climbs the loss) and below {MAX_LR:,.0f}; "
                                  "e.g. lrs=(0.1, 1.0, 10.0).") from None
        real_number(self.weight_decay, "weight_decay", 0, "use 0 for none (MAE's probe) or a small value like 0.05")
        real_number(self.momentum, "momentum", 0, "use 0.9 as MAE's LARS does", maximum=1)
        whole_number(self.min_steps, "min_steps", 0, "use 0 unless tiny training sets need more steps")

    def scaled_lrs(self, batch_size: int) -> list[float]:
        """The learning rates actually used for a batch size."""
        return [lr * batch_size / 256 for lr in self.lrs]


class ProbeHead(nn.Module):
    """A pooling head, then MAE's probe: BatchNorm1d without affine, then Linear (weights N(0, 0.01))."""

    def __init__(self, pool: Aggregator, num_classes: int):
        super().__init__()
        self.pool = pool
        self.bn = nn.BatchNorm1d(pool.out_dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(pool.out_dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B, classes); `keep` marks the tokens the head may pool (see `heads`)."""
        return self.linear(self.bn(self.pool(tokens, keep)[0]))


@dataclass
class ProbeResult:
    """A learning-rate sweep: val accuracy per lr, the chosen lr and head, its test accuracy."""

    head_name: str
    lrs: list[float]
    val_by_lr: list[float]
    best_lr: float
    val: float
    test: float | None
    head: ProbeHead
    seed: int
    losses: list[float] = field(repr=False, default_factory=list)

    @property
    def lr_at_edge(self) -> bool:
        """Whether the chosen lr is the smallest or the largest tried (then widen the grid)."""
        return self.best_lr in (self.lrs[0], self.lrs[-1]) and len(self.lrs) > 1


def probe_head(head_name: str, source: TokenSet | nn.Module, num_classes: int, seed: int | None = 0,
               **options) -> ProbeHead:
    """A freshly initialised probe for a TokenSet's or a timm ViT's tokens: the head `head_name` of
    `heads.HEAD_KINDS` (with `options`), then BatchNorm and a linear layer.

    Its initialisation depends on `seed` only; `seed=None` draws it from torch's global generator.
    """
    dim, layout = head_inputs(source)
    if seed is None:
        return ProbeHead(make_head(head_name, dim, layout, **options), num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ProbeHead(make_head(head_name, dim, layout, **options), num_classes)


def head_inputs(source: TokenSet | nn.Module) -> tuple[int, TokenLayout]:
    """The token width and layout a head needs, from a TokenSet or a timm ViT."""
    if isinstance(source, TokenSet):
        return source.dim, source.layout
    if isinstance(source, nn.Module) and hasattr(source, "embed_dim") and hasattr(source, "patch_embed"):
        return int(source.embed_dim), token_layout(source)
    raise SelaggError(f"A probe reads its tokens' width and layout from a features.TokenSet or a timm ViT, got a "
                      f"{type(source).__name__}; pass one of those, or build the head with heads.make_head("
                      f"name, dim, layout) from the names {', '.join(HEAD_KINDS)}.")


def train_probes(head_name: str, train: TokenSet, val: TokenSet, test: TokenSet | None = None,
                 recipe: ProbeRecipe = ProbeRecipe(), seeds: tuple[int, ...] = (0, 1, 2),
                 device: str | torch.device = "cpu", **head_kwargs) -> list[ProbeResult]:
    """One lr sweep per seed, all trained together; each seed picks its lr on val and reports test.

    A seed sets both the head's initialisation and its batch order, so the spread over seeds is the
    spread one would get from separate runs.
    """
    seeds = checked_seeds(seeds)
    check_probe_inputs(recipe, train, val, test)
    resolve_device(device)  # a device this machine lacks: a sentence before any work
    num_classes = max(train.num_classes, val.num_classes)
    k = len(recipe.lrs)
    heads = [probe_head(head_name, train, num_classes, s, **head_kwargs) for s in seeds for _ in range(k)]
    from .sweep.loop import sweep_copies  # the fast path: train_one_probe's loop for every copy at once

    val_acc, diverged, losses = sweep_copies(heads, train, val, recipe, seeds, device)
    results = []
    for g, seed in enumerate(seeds):
        acc = usable_accuracies(val_acc[g * k:(g + 1) * k], diverged[g * k:(g + 1) * k], recipe.lrs, head_name, seed)
        best = int(np.nanargmax(acc))  # first best: the smallest such lr
        head = heads[g * k + best].cpu().eval()
        test_acc = probe_accuracy(head, test) if test is not None else None
        results.append(ProbeResult(head_name, list(recipe.lrs), acc, recipe.lrs[best], acc[best], test_acc, head,
                                   seed, losses))
    return results


# ----------------------------------------------------------------------------- the reference loop
def train_one_probe(head: ProbeHead, train: TokenSet, recipe: ProbeRecipe, lr: float, seed: int = 0) -> list[float]:
    """Train one probe head at one base learning rate on cached tokens; returns the loss of every step.

    The plain loop behind `train_probes`, which runs it for every learning rate and seed at once
    (`sweep.loop.fit_stack`): the same batches, schedule, loss and optimizer arithmetic.
    """
    n, bs = len(train), min(recipe.batch_size, len(train))
    total = max(recipe.epochs * (n // bs), recipe.min_steps)
    warmup = round(total * recipe.warmup_epochs / recipe.epochs)
    optimizer = probe_optimizer(head, recipe, lr * bs / 256)  # MAE scales the lr by batch / 256
    schedule = CosineLRScheduler(optimizer, t_initial=max(total - warmup, 1), warmup_t=warmup,
                                 warmup_prefix=True, t_in_epochs=False)
    batch_order = torch.Generator().manual_seed(seed)
    head.train()
    losses: list[float] = []
    while len(losses) < total:
        order = torch.randperm(n, generator=batch_order)  # a new shuffle every epoch
        for i in range(n // bs):
            if len(losses) == total:
                break
            idx = order[i * bs:(i + 1) * bs]
            schedule.step_update(len(losses))  # linear warm-up, then cosine
            loss = F.cross_entropy(head(train.tokens[idx].float()), train.labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


def probe_optimizer(head: ProbeHead, recipe: ProbeRecipe, lr: float) -> torch.optim.Optimizer:
    """LARS (MAE's probe) or AdamW; weight decay and LARS's adaptation for matrices only, not vectors."""
    params = [p for p in head.parameters() if p.requires_grad]
    matrices = {"params": [p for p in params if p.ndim > 1], "weight_decay": recipe.weight_decay}
    vectors = {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}
    if recipe.optimizer == "lars":
        return Lars([{**matrices, "always_adapt": True}, vectors], lr=lr, momentum=recipe.momentum)
    return torch.optim.AdamW([matrices, vectors], lr=lr)


def checked_seeds(seeds) -> tuple[int, ...]:
    """The seeds as a tuple of whole numbers >= 0, or a SelaggError."""
    seeds = (seeds,) if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool) else seeds
    if hasattr(seeds, "__iter__") and not isinstance(seeds, (str, bytes)):
        seeds = sequence_of(seeds, "seeds", "(0, 1, 2)")
    if not isinstance(seeds, tuple) or len(seeds) == 0:
        raise SelaggError(f"seeds={seeds!r} is not accepted: give a non-empty sequence of whole numbers, "
                          "e.g. (0, 1, 2).")
    return tuple(whole_number(s, "seed", 0, "seeds are whole numbers such as (0, 1, 2)") for s in seeds)


def check_probe_inputs(recipe: ProbeRecipe, train: TokenSet, val: TokenSet, test: TokenSet | None) -> None:
    """Refuse splits that cannot train or score a probe: too few images, mismatched or non-finite tokens."""
    options_object(recipe, ProbeRecipe, "recipe", "probing.ProbeRecipe(epochs=90, lrs=(0.1, 1.0))")
    splits = {"train": train, "val": val, **({"test": test} if test is not None else {})}
    for name, tokens in splits.items():
        if not isinstance(tokens, TokenSet):
            raise SelaggError(f"The {name} split must be a TokenSet (from features.cached_tokens), got a "
                              f"{type(tokens).__name__}.")
        least = 2 if name == "train" else 1
        if len(tokens) < least:
            raise SelaggError(f"The {name} split holds {len(tokens)} image(s); a probe needs at least {least} there "
                              "(BatchNorm trains on batches of 2 or more): pass a larger split.")
        if int(tokens.labels.min()) < 0:
            raise SelaggError(f"The {name} split has negative labels; labels must be class indices 0, 1, 2, ...")
        layout = (tokens.dim, tokens.num_prefix_tokens, tokens.has_cls, tuple(tokens.grid_size))
        if layout != (train.dim, train.num_prefix_tokens, train.has_cls, tuple(train.grid_size)):
            raise SelaggError(f"The {name} split's tokens (width, prefix tokens, [cls], grid = {layout}) differ from "
                              "the train split's; probe tokens of one backbone and block in every split.")
        check_finite_tokens(tokens, name)
    check_same_source(splits)
    trained = set(train.labels.unique().tolist())
    for name, tokens in splits.items():
        unseen = sorted(set(tokens.labels.unique().tolist()) - trained)
        if unseen:
            raise SelaggError(f"The {name} split holds class(es) {unseen[:5]} that the train split lacks, so no probe "
                              "could ever predict them and its accuracy would mean little; draw the splits from one "
                              "dataset with every class in each (an image cap at least the number of classes).")


_FINITE_CHECKED: dict[int, tuple[weakref.ref, int]] = {}


def check_finite_tokens(tokens: TokenSet, split: str) -> None:
    """Raise a SelaggError naming the first image whose tokens hold NaN or infinity (each tensor checked once)."""
    t = tokens.tokens
    try:
        version = t._version
    except RuntimeError:  # an inference tensor: it cannot be changed in place outside inference mode
        version = -1
    seen = _FINITE_CHECKED.get(id(t))
    if seen is not None and seen[0]() is t and seen[1] == version:
        return
    index = first_nonfinite_item(t)
    if index is not None:
        raise SelaggError(f"The {split} tokens of image {index} contain NaN or infinite values, which would make "
                          "every probe on them score at chance; only finite tokens are accepted: extract them "
                          "again from finite images, or leave that image out with tokens.subset(...).")
    for key in [key for key, (ref, _) in _FINITE_CHECKED.items() if ref() is None]:
        del _FINITE_CHECKED[key]
    _FINITE_CHECKED[id(t)] = (weakref.ref(t), version)


def train_probe(head_name: str, train: TokenSet, val: TokenSet, test: TokenSet | None = None,
                recipe: ProbeRecipe = ProbeRecipe(), seed: int = 0, device: str | torch.device = "cpu",
                **head_kwargs) -> ProbeResult:
    """Train a head at every lr of the recipe together on cached tokens; pick the lr on val, report test."""
    return train_probes(head_name, train, val, test, recipe, (seed,), device, **head_kwargs)[0]


@torch.no_grad()
def probe_accuracy(head: ProbeHead, tokens: TokenSet, batch_size: int = 1024) -> float:
    """Accuracy of one trained probe head on a token set."""
    check_finite_tokens(tokens, "scored")
    head.eval()
    device = next(head.parameters()).device
    correct = 0
    for i in range(0, len(tokens), batch_size):
        logits = head(tokens.tokens[i:i + batch_size].to(device).float())
        correct += int((logits.argmax(-1).cpu() == tokens.labels[i:i + batch_size]).sum())
    return correct / len(tokens)


@torch.no_grad()
def head_weights(head: ProbeHead | Aggregator, tokens: torch.Tensor) -> torch.Tensor:
    """The per-token weights (B, T) a trained head gives to some tokens."""
    pool = head.pool if isinstance(head, ProbeHead) else head
    pool.eval()
    return pool(tokens.float())[1]


# ----------------------------------------------------------------------------- low-shot
@dataclass(frozen=True)
class LowShot:
    """A low-shot experiment: `shots` labelled images per class, `draws` random draws (draw d trains with seed
    `seed + d`), and at least `min_steps` training steps however few images there are."""

    shots: int
    draws: int = 3
    seed: int = 0
    min_steps: int = 200

    def __post_init__(self) -> None:
        """Refuse a plan that would draw no images, or seed or train with a negative number."""
        whole_number_fields(self, {"shots": (1, "give the number of labelled images per class, e.g. shots=5"),
                                   "draws": (1, "draw at least one subset of images (3 by default)"),
                                   "seed": (0, "seeds are whole numbers such as 0"),
                                   "min_steps": (0, "use 0 for no extra minimum (200 by default)")})


def low_shot_indices(labels: torch.Tensor, shots: int, draws: int = 3, seed: int = 0) -> list[torch.Tensor]:
    """`draws` random subsets with `shots` images of every class each (a different draw per subset)."""
    whole_number(draws, "draws", 1, "draw at least one subset of images (3 by default)")
    classes, counts = torch.unique(labels, return_counts=True)
    if shots < 1 or shots > int(counts.min()):
        poorest = int(classes[counts.argmin()])
        raise SelaggError(f"Asked for {shots} labelled images per class but class {poorest} has only "
                          f"{int(counts.min())}; choose between 1 and {int(counts.min())} shots.")
    rng = np.random.default_rng([seed, shots])
    subsets = []
    for _ in range(draws):
        picks = [rng.choice(np.flatnonzero(labels.numpy() == c), shots, replace=False) for c in classes.tolist()]
        subsets.append(torch.from_numpy(np.sort(np.concatenate(picks))))
    return subsets


def low_shot_accuracy(head_name: str, train: TokenSet, val: TokenSet, test: TokenSet, plan: LowShot,
                      recipe: ProbeRecipe = ProbeRecipe(), device: str | torch.device = "cpu",
                      **head_kwargs) -> list[float]:
    """Test accuracy of a head trained on `plan.shots` images per class, for each of `plan.draws` random draws.

    Tiny training sets make few steps per epoch, so training runs at least `plan.min_steps` steps.
    """
    options_object(plan, LowShot, "plan", "probing.LowShot(shots=5, draws=3)")
    recipe = replace(recipe, min_steps=max(recipe.min_steps, plan.min_steps))
    results = []
    for d, index in enumerate(low_shot_indices(train.labels, plan.shots, plan.draws, plan.seed)):
        results.append(train_probe(head_name, train.subset(index), val, test, recipe, plan.seed + d, device=device,
                                   **head_kwargs).test)
    return results


def summarise(values: list[float]) -> tuple[float, float]:
    """Mean and standard deviation (ddof=1 when there are several values)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def fmt(values: list[float], scale: float = 100.0) -> str:
    """'mean ± std' in percent."""
    m, s = summarise(values)
    return f"{scale * m:.1f} ± {scale * s:.1f}"


def usable_accuracies(acc: list[float], diverged: list[bool], lrs: tuple[float, ...], head_name: str,
                      seed: int) -> list[float]:
    """Val accuracy per lr with NaN where the copy diverged (one line names them), or a SelaggError if all did."""
    if all(diverged):
        raise SelaggError(f"Every learning rate of the {head_name!r} probe with seed {seed} diverged (NaN or "
                          f"infinite weights) at lrs={lrs}; no head was trained, so lower the learning rates.")
    if any(diverged):
        notice(f"{head_name!r} probe, seed {seed}: learning rate(s) "
               f"{', '.join(f'{lr:g}' for lr, d in zip(lrs, diverged) if d)} diverged (NaN or infinite weights) "
               "and were left out of the choice.")
    return [float("nan") if d else a for a, d in zip(acc, diverged)]
