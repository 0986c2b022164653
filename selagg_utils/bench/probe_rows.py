"""The probe side of chapter 07's ladder: online vs cached epochs, many learning rates in one pass, the heads.

Every measurement is a whole training epoch of probes on random images and labels (timing does not
depend on what the images show), returned as a `rows.BenchRow`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checks import SelaggError
from ..config import DTYPES, autocast
from ..heads import HEAD_KINDS
from ..probing import ProbeRecipe, probe_head
from ..sweep.optimizers import make_optimizer
from ..sweep.stacks import ProbeStack
from .rows import BenchRow, MeasureOptions, measure, random_images
from .timing import count_flops, count_params, eager, forward_gflop_per_image

__all__ = ["probe_bank", "probe_data", "online_epoch_fn", "online_vs_cached", "one_vs_many_lrs",
           "compare_heads", "probe_ladder"]

#: The probes the ladder compares, by name, and the head of `heads.HEAD_KINDS` each one pools with.
PROBE_KINDS = {"linear": "cls", "abmilp": "abmilp", "attentive": "attentive"}
#: How probe rows are timed unless the caller says otherwise: three epochs after one warm-up epoch, in fp32.
PROBE_TIMING = MeasureOptions(repeats=3)


# ---------------------------------------------------------------- probes

def probe_kind_head(kind: str) -> str:
    """The registered head (`heads.HEAD_KINDS`) a probe kind of the ladder pools with."""
    if kind not in PROBE_KINDS:
        raise SelaggError(f"Unknown probe {kind!r}; choose one of "
                          f"{', '.join(f'{k} ({HEAD_KINDS[h].summary})' for k, h in PROBE_KINDS.items())}.")
    return PROBE_KINDS[kind]


def probe_bank(kind: str, model: nn.Module, num_classes: int, lrs: list[float],
               device: torch.device | str = "cpu") -> tuple[nn.Module, torch.optim.Optimizer]:
    """len(lrs) probes of one kind trained together, and one LARS optimizer with a parameter group per lr.

    Uses `sweep.stacks.ProbeStack` (the probes computed in one batched call) and `sweep.optimizers.make_optimizer`.
    """
    stack = ProbeStack([probe_head(probe_kind_head(kind), eager(model), num_classes, seed=None)
                        for _ in lrs]).to(device)
    return stack, make_optimizer(stack, ProbeRecipe(optimizer="lars"), list(lrs))


def bank_members(bank: nn.Module) -> list[nn.Module]:
    """The individual probes of a bank."""
    return list(bank.heads)


def learning_rates(count: int, low: float = 1e-3, high: float = 1.0) -> list[float]:
    """`count` learning rates spaced evenly on a log scale from `low` to `high`."""
    if count == 1:
        return [math.sqrt(low * high)]
    return [low * (high / low) ** (i / (count - 1)) for i in range(count)]


def train_step_fn(bank: nn.Module, optimizer: torch.optim.Optimizer, precision: str) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One optimisation step of every probe in a bank on one token batch.

    The probes share no parameters, so the sum of their losses gives each exactly its own gradient.
    """

    def step(tokens: torch.Tensor, labels: torch.Tensor) -> None:
        with autocast(tokens.device, precision):
            logits = bank(tokens)  # (K, B, classes)
        k = logits.shape[0]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.repeat(k), reduction="sum") / len(labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


# ---------------------------------------------------------------- tokens and data

def backbone_tokens(model: nn.Module, images: torch.Tensor, precision: str) -> torch.Tensor:
    """The frozen backbone's output tokens (after the final norm), without gradients."""
    with torch.no_grad(), autocast(images.device, precision):
        return eager(model).forward_features(images)


def tokens_in_memory(model: nn.Module, batches: list[torch.Tensor], precision: str) -> torch.Tensor:
    """All output tokens of some image batches, kept on their device in the run's precision (not `features.cached_tokens`'s disk cache)."""
    dtype = DTYPES[precision]
    return torch.cat([backbone_tokens(model, x, precision).to(dtype) for x in batches])


@dataclass
class ProbeData:
    """Random images, labels and their tokens kept in memory: `steps` batches of one size on one device."""

    images: list[torch.Tensor]
    labels: list[torch.Tensor]
    tokens: torch.Tensor | None = None
    num_classes: int = 10

    @property
    def batch_size(self) -> int:
        return len(self.labels[0])

    @property
    def num_images(self) -> int:
        return sum(len(y) for y in self.labels)

    @property
    def device(self) -> torch.device:
        return self.images[0].device

    def token_batches(self) -> list[torch.Tensor]:
        """The tokens in memory split back into batches."""
        return list(self.tokens.split(self.batch_size))


def probe_data(model: nn.Module, batch_size: int, steps: int, device: torch.device, num_classes: int = 10) -> ProbeData:
    """`steps` random batches with random labels (timing does not depend on what the images show)."""
    if steps < 1:
        raise SelaggError(f"The number of steps must be a positive integer, got {steps}.")
    gen = torch.Generator().manual_seed(1)
    images = [random_images(model, batch_size, device, seed=i) for i in range(steps)]
    labels = [torch.randint(0, num_classes, (batch_size,), generator=gen).to(device) for _ in range(steps)]
    return ProbeData(images, labels, num_classes=num_classes)


def _ensure_tokens(model: nn.Module, data: ProbeData, precision: str) -> None:
    """Fill `data.tokens` once, if no earlier measurement did."""
    if data.tokens is None:
        data.tokens = tokens_in_memory(model, data.images, precision)


# ---------------------------------------------------------------- epochs

def online_epoch_fn(model: nn.Module, step: Callable, data: ProbeData, precision: str) -> Callable[[], None]:
    """One epoch as the paper's reference code runs it: the frozen backbone on every batch, then the probe step."""

    def epoch() -> None:
        for x, y in zip(data.images, data.labels):
            step(backbone_tokens(model, x, precision), y)

    return epoch


def cached_epoch_fn(step: Callable, data: ProbeData) -> Callable[[], None]:
    """One epoch on cached tokens: only the probe step."""
    batches = data.token_batches()

    def epoch() -> None:
        for tokens, y in zip(batches, data.labels):
            step(tokens, y)

    return epoch


def _sequential_lrs_fn(model: nn.Module, data: ProbeData, precision: str, num_classes: int,
                       lrs: list[float]) -> Callable[[], None]:
    """One cached epoch per learning rate, one probe at a time (the loop a multi-lr pass replaces)."""
    steps = [train_step_fn(*probe_bank("linear", model, num_classes, [lr], data.device), precision) for lr in lrs]
    epochs = [cached_epoch_fn(s, data) for s in steps]

    def all_epochs() -> None:
        for epoch in epochs:
            epoch()

    return all_epochs


def training_gflop_per_image(step: Callable, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    """GFLOP per image of one probe training step (forward, backward and update), counted on two images."""
    n = min(2, len(labels))
    return count_flops(lambda: step(tokens[:n], labels[:n])) / 1e9 / n


def measure_epoch(step_name: str, epoch: Callable[[], None], data: ProbeData, options: MeasureOptions) -> BenchRow:
    """Time whole epochs (one warm-up epoch, then `options.repeats`); images/s counts every image of the epoch."""
    return measure(step_name, epoch, data.device, data.batch_size,
                   replace(options, images_per_call=data.num_images, warmup=1))


# ---------------------------------------------------------------- the rows

def online_vs_cached(model: nn.Module, data: ProbeData, options: MeasureOptions = PROBE_TIMING) -> list[BenchRow]:
    """Three rows: filling the token cache once, an online epoch (backbone on every batch) and a cached epoch of a
    linear probe; `options` gives the rows' model name, precision, timed epochs and peak."""
    device, precision = data.device, options.precision
    gflop_backbone = forward_gflop_per_image(model, data.images[0])
    bank, opt = probe_bank("linear", model, data.num_classes, learning_rates(1), device)
    step = train_step_fn(bank, opt, precision)

    def fill_cache() -> None:
        data.tokens = tokens_in_memory(model, data.images, precision)

    cache_row = measure("cache tokens (once)", fill_cache, device, data.batch_size, MeasureOptions(
        model=options.model, precision=precision, gflop_per_image=gflop_backbone, images_per_call=data.num_images,
        warmup=0, repeats=1, peak=options.peak, note=f"{data.num_images} images kept on {device.type} in {precision}"))
    head_gflop = training_gflop_per_image(step, data.token_batches()[0], data.labels[0])
    common = _row_options(options, params=count_params(bank))
    online = measure_epoch("online epoch, linear", online_epoch_fn(model, step, data, precision), data,
                           replace(common, gflop_per_image=gflop_backbone + head_gflop,
                                   note="backbone forward on every batch"))
    cached = measure_epoch("cached epoch, linear", cached_epoch_fn(step, data), data,
                           replace(common, gflop_per_image=head_gflop, versus=online, note="probe step only"))
    return [cache_row, online, cached]


def one_vs_many_lrs(model: nn.Module, data: ProbeData, options: MeasureOptions = PROBE_TIMING, *,
                    n_lrs: int = 8) -> list[BenchRow]:
    """Two rows on cached tokens: `n_lrs` linear probes trained one pass each, then all in one pass."""
    precision = options.precision
    _ensure_tokens(model, data, precision)
    lrs = learning_rates(n_lrs)
    bank, opt = probe_bank("linear", model, data.num_classes, lrs, data.device)
    step = train_step_fn(bank, opt, precision)
    gflop = training_gflop_per_image(step, data.token_batches()[0], data.labels[0])
    common = _row_options(options, params=count_params(bank), gflop_per_image=gflop)
    separate = measure_epoch(f"{n_lrs} lrs, {n_lrs} cached passes",
                             _sequential_lrs_fn(model, data, precision, data.num_classes, lrs), data,
                             replace(common, note="one probe per pass"))
    together = measure_epoch(f"{n_lrs} lrs, one cached pass", cached_epoch_fn(step, data), data,
                             replace(common, versus=separate, note="one optimizer, a parameter group per lr"))
    return [separate, together]


def compare_heads(model: nn.Module, data: ProbeData, options: MeasureOptions = PROBE_TIMING, *,
                  heads: tuple[str, ...] = tuple(PROBE_KINDS)) -> list[BenchRow]:
    """A cached epoch of each probe head: time, memory and parameter count, each against the first head."""
    _ensure_tokens(model, data, options.precision)
    rows: list[BenchRow] = []
    for kind in heads:
        bank, opt = probe_bank(kind, model, data.num_classes, learning_rates(1), data.device)
        step = train_step_fn(bank, opt, options.precision)
        gflop = training_gflop_per_image(step, data.token_batches()[0], data.labels[0])
        rows.append(measure_epoch(f"{kind} head, cached epoch", cached_epoch_fn(step, data), data, _row_options(
            options, gflop_per_image=gflop, params=count_params(bank), versus=rows[0] if rows else None)))
    return rows


def probe_ladder(model: nn.Module, data: ProbeData, options: MeasureOptions = PROBE_TIMING, *,
                 heads: tuple[str, ...] = tuple(PROBE_KINDS), n_lrs: int = 8) -> list[BenchRow]:
    """The probe side of the ladder: online vs cached epochs, one vs many learning rates in one pass, and the heads."""
    return (online_vs_cached(model, data, options) + one_vs_many_lrs(model, data, options, n_lrs=n_lrs)
            + compare_heads(model, data, options, heads=heads))


def _row_options(options: MeasureOptions, **measured) -> MeasureOptions:
    """The options of one probe row: the caller's model name, precision, repeats and peak, and what was measured."""
    return MeasureOptions(model=options.model, precision=options.precision, repeats=options.repeats,
                          peak=options.peak, **measured)
