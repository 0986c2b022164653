"""Probe sweeps trained by several processes together, each holding its own part of the training tokens.

`train_probes_distributed` gives what `probing.train_probes` gives on the whole split, within float
tolerance, on every process. The batches are `probing.fit_stack`'s: drawn from global image indices
and the seed, so one process and W processes see the same global batches; each process computes the
images of each batch that lie in its part. BatchNorm normalises with the statistics of the whole
global batch (its sums are added across processes, as in `torch.nn.SyncBatchNorm`), the loss is
summed over the global batch and divided by its size, and the gradients are summed across processes
before every optimizer step, which is then the same step everywhere. Validation and test
accuracies are correct counts summed across processes.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..checks import SelaggError, options_object, whole_number, whole_number_fields
from ..features import TokenSet, check_same_source
from ..heads import negligible_grad_dropped
from ..models import TokenLayout
from ..probing import ProbeRecipe, ProbeResult, check_finite_tokens, checked_seeds, probe_head, usable_accuracies
from ..sweep.loop import fit_stack
from ..sweep.stacks import ProbeStack, diverged_copies, stack_correct, training_source
from .distributed import ProcessInfo, current_process

__all__ = ["train_probes_distributed", "ProbeProblem", "bench_probe_epoch"]


# ----------------------------------------------------------------------------- collectives
def _summed(t: torch.Tensor, info: ProcessInfo, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """`t` reduced over all processes (a new tensor, on t's device); `t` itself in one process."""
    if info.world_size == 1:
        return t
    wire = t.detach().to(_wire_device(info), copy=True).contiguous()
    dist.all_reduce(wire, op=op)
    return wire.to(t.device)


def _wire_device(info: ProcessInfo) -> torch.device:
    """Where collectives take their tensors: the GPU under NCCL, else the CPU."""
    return info.device if dist.get_backend() == "nccl" else torch.device("cpu")


class _SummedWithGradient(torch.autograd.Function):
    """A sum over processes whose backward is the sum of the gradients over processes (as in SyncBatchNorm)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _gathered(obj, info: ProcessInfo) -> list:
    """Every process's `obj`, in rank order."""
    if info.world_size == 1:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def _raise_if_any(problem: str | None, info: ProcessInfo) -> None:
    """Raise the first process's problem on every process (so that none waits forever in a collective)."""
    problems = _gathered(problem, info)
    for rank, message in enumerate(problems):
        if message is not None:
            where = f"Process {rank} of {info.world_size}: " if info.world_size > 1 else ""
            raise SelaggError(where + message)


# ----------------------------------------------------------------------------- the global batch, part by part
def local_rows_of_batch(local_row: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This part's rows of a global batch idx (S, B): rows (S, P) and weights (S, P), 1 for its images, 0 for padding.

    `local_row` maps a global image index to its row in this part (-1 if another part holds it).
    P is the most images any group's batch has in this part (at least 1); padding reads row 0.
    """
    rows = local_row[idx]
    mine = rows >= 0
    p = max(int(mine.sum(1).max()), 1)
    order = torch.sort((~mine).to(torch.int8), dim=1, stable=True).indices[:, :p]  # this part's positions first
    return rows.gather(1, order).clamp(min=0), mine.gather(1, order).float()


def synced_batch_norm(z: torch.Tensor, weight: torch.Tensor, batch: int, eps: float,
                      info: ProcessInfo) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z (G, P, D) normalised with the mean and (biased) variance of the global batch; returns (normalised, mean, var).

    `weight` (G, P) is 1 for this part's images and 0 for padding; `batch` is the global batch size.
    The sums are added across processes with autograd, so gradients flow through the statistics.
    """
    w = weight[..., None]
    add = _SummedWithGradient.apply if info.world_size > 1 else (lambda t: t)
    mean = add((z * w).sum(1)) / batch  # (G, D)
    centred = z - mean[:, None]
    var = add((centred.square() * w).sum(1)) / batch
    return centred * torch.rsqrt(var + eps)[:, None], mean, var


def _running_stats_updated(stack: ProbeStack, mean: torch.Tensor, var: torch.Tensor, batch: int) -> None:
    """Every copy's running statistics moved towards the global batch's, as BatchNorm does (unbiased variance)."""
    bns = [h.bn for h in stack.heads]
    per = len(bns) // len(mean)
    m = bns[0].momentum
    with torch.no_grad():
        unbiased = var * batch / (batch - 1)
        means, variances = [bn.running_mean for bn in bns], [bn.running_var for bn in bns]
        torch._foreach_mul_(means + variances, 1 - m)
        torch._foreach_add_(means + variances, [mean[k // per] for k in range(len(bns))]
                            + [unbiased[k // per] for k in range(len(bns))], alpha=m)
        torch._foreach_add_([bn.num_batches_tracked for bn in bns], 1)


def _gradients_summed(stack: ProbeStack, loss: torch.Tensor, info: ProcessInfo) -> float:
    """Every gradient replaced by its sum over processes (one collective, the loss with it); returns the summed loss."""
    params = [p for p in stack.parameters() if p.grad is not None]
    if info.world_size == 1:
        return loss.item()
    flat = _summed(torch.cat([p.grad.reshape(-1) for p in params] + [loss.detach().reshape(1)]), info)
    for p, g in zip(params, flat[:-1].split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))
    return flat[-1].item()


def synced_backward(stack: ProbeStack, tokens_of: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                    indices: torch.Tensor, n: int, batch: int, info: ProcessInfo) -> Callable[[torch.Tensor], float]:
    """`fit_stack`'s forward and backward pass of a global batch, for this part's images (`labels`, `indices`).

    The gradients it leaves are those of the whole global batch's loss, on every process.
    """
    per_group = len(stack.heads) // stack.groups
    local_row = torch.full((n,), -1, dtype=torch.long)
    local_row[indices] = torch.arange(len(indices))

    def backward_of(idx: torch.Tensor) -> float:
        rows, weight = local_rows_of_batch(local_row, idx)  # (S, P)
        features = tokens_of(rows)
        z = features if stack.prepooled else stack.pooled(features)  # (S, P, D) pooled once, or (K, P, D)
        weight = weight.to(z.device)
        zn, mean, var = synced_batch_norm(z, weight.repeat_interleave(len(z) // stack.groups, 0), batch,
                                          stack.heads[0].bn.eps, info)
        _running_stats_updated(stack, mean.detach(), var.detach(), batch)
        zn = zn.repeat_interleave(len(stack.heads) // len(zn), 0)  # (K, P, D)
        w = torch.stack([h.linear.weight for h in stack.heads])
        b = torch.stack([h.linear.bias for h in stack.heads])
        logits = negligible_grad_dropped(torch.baddbmm(b[:, None], zn, w.transpose(1, 2)))  # (K, P, classes)
        y = labels[rows].to(z.device).repeat_interleave(per_group, 0)
        per_image = F.cross_entropy(logits.transpose(1, 2).contiguous(), y, reduction="none")  # (K, P)
        loss = (per_image * weight.repeat_interleave(per_group, 0)).sum() / batch
        loss.backward()
        return _gradients_summed(stack, loss, info) / len(stack.heads)
    return backward_of


# ----------------------------------------------------------------------------- checks that every process agrees on
def _part_problem(train: TokenSet, val: TokenSet, test: TokenSet | None, indices) -> str | None:
    """What is wrong with this process's parts, in one sentence, or None."""
    splits = {"train": train, "val": val, **({"test": test} if test is not None else {})}
    for name, part in splits.items():
        if not isinstance(part, TokenSet):
            return (f"The {name} part must be a TokenSet (e.g. store.token_set(rank, world)), got a "
                    f"{type(part).__name__}.")
    if len(train) == 0:
        return ("This process holds no training images; start at most as many processes as the store has shards, "
                "so that every process holds some.")
    for name, part in splits.items():
        layout = (part.dim, part.num_prefix_tokens, part.has_cls, tuple(part.grid_size))
        if layout != (train.dim, train.num_prefix_tokens, train.has_cls, tuple(train.grid_size)):
            return (f"The {name} part's tokens (width, prefix tokens, [cls], grid = {layout}) differ from the train "
                    "part's; probe tokens of one backbone and block in every split.")
        if len(part) and int(part.labels.min()) < 0:
            return f"The {name} part has negative labels; labels must be class indices 0, 1, 2, ..."
        try:
            check_finite_tokens(part, name)
        except SelaggError as err:
            return str(err)
    try:
        check_same_source(splits)
    except SelaggError as err:
        return str(err)
    if indices is not None and (not isinstance(indices, torch.Tensor) or indices.shape != (len(train),)
                                or indices.dtype.is_floating_point or indices.dtype == torch.bool):
        return (f"train_indices must be a 1-D integer tensor with one global index per image of the train part "
                f"({len(train)}), got {getattr(indices, 'dtype', type(indices).__name__)} "
                f"{tuple(getattr(indices, 'shape', ()))}; pass store.part_indices(rank, world).")
    return None


def _whole_split(tokens: TokenSet | None) -> str:
    """The key of the whole split a part belongs to (its part number left out), as text that processes compare."""
    key = {} if tokens is None else {k: v for k, v in tokens.key.items() if k not in ("part", "parts", "subset")}
    return json.dumps(key, sort_keys=True, default=str)


def _global_indices(indices: torch.Tensor | None, sizes: list[int], info: ProcessInfo) -> torch.Tensor:
    """This part's global image indices: the ones given, else the parts laid end to end in rank order."""
    if indices is None:
        start = sum(sizes[:info.rank])
        return torch.arange(start, start + sizes[info.rank])
    return indices.long().cpu()


def global_labels(labels: torch.Tensor, indices: torch.Tensor, n: int, info: ProcessInfo) -> torch.Tensor:
    """The labels of the whole split by global index (N,); SelaggError unless the parts hold each index once."""
    inside = bool(((indices >= 0) & (indices < n)).all())
    _raise_if_any(None if inside else f"train_indices hold values outside 0..{n - 1}, but the parts hold {n} "
                  "images together; pass each part's global indices (store.part_indices(rank, world)).", info)
    table = torch.zeros(2, n, dtype=torch.long)
    table[0].index_add_(0, indices, labels.long().cpu())
    table[1].index_add_(0, indices, torch.ones_like(indices))
    table = _summed(table, info)
    if not bool((table[1] == 1).all()):
        first = int((table[1] != 1).nonzero()[0])
        raise SelaggError(f"The parts hold global image {first} {int(table[1, first])} times; each image must be in "
                          "exactly one part: pass each part's global indices (store.part_indices(rank, world)).")
    return table[0]


# ----------------------------------------------------------------------------- the sweep
def train_probes_distributed(head_name: str, train: TokenSet, val: TokenSet, test: TokenSet | None = None,
                             recipe: ProbeRecipe | None = None, seeds=(0,), *,
                             train_indices: torch.Tensor | None = None, **head_kwargs) -> list[ProbeResult]:
    """`probing.train_probes` on whole splits of which each process holds a part; the same result on every process.

    The processes, and each one's device, are `distributed.current_process()`'s. `train_indices` are
    the global indices of this part's training images (`store.part_indices(rank, world)`); without
    them the parts are taken to lie end to end in rank order.
    """
    info = current_process()
    recipe = options_object(recipe, ProbeRecipe, "recipe", "probing.ProbeRecipe(epochs=90, lrs=(0.1, 1.0))",
                            ProbeRecipe())
    seeds = checked_seeds(seeds)
    _raise_if_any(_part_problem(train, val, test, train_indices), info)
    parts = _gathered((len(train), len(val), None if test is None else len(test),
                       (train.dim, train.num_prefix_tokens, train.has_cls, tuple(train.grid_size)),
                       max(int(train.labels.max()), int(val.labels.max()) if len(val) else 0) + 1,
                       tuple(_whole_split(t) for t in (train, val, test)),
                       (set(train.labels.unique().tolist()), {int(y) for t in (val, test) if t is not None
                                                               for y in t.labels.unique().tolist()})), info)
    sizes = [p[0] for p in parts]
    n, n_val = sum(sizes), sum(p[1] for p in parts)
    if len({p[3] for p in parts}) > 1:
        raise SelaggError(f"The processes hold tokens of different layouts {sorted({p[3] for p in parts})}; "
                          "give every process its part of one store.")
    if len({p[5] for p in parts}) > 1:
        raise SelaggError("The processes hold parts of different splits (their keys differ beyond the part each "
                          "holds); give every process its part of the same train, val and test stores.")
    unseen = sorted(set().union(*(p[6][1] for p in parts)) - set().union(*(p[6][0] for p in parts)))
    if unseen:
        raise SelaggError(f"The val or test parts hold class(es) {unseen[:5]} that the train parts lack, so no probe "
                          "could ever predict them; draw the splits from one dataset with every class in each.")
    if len({p[2] is None for p in parts}) > 1:
        raise SelaggError("Some processes hold a test part and some do not; pass a test part to all or to none.")
    if n < 2 or n_val < 1:
        raise SelaggError(f"The parts hold {n} training and {n_val} validation images together; a probe needs at "
                          "least 2 and 1 (BatchNorm trains on batches of 2 or more): pass larger splits.")
    indices = _global_indices(train_indices, sizes, info)
    labels = global_labels(train.labels, indices, n, info)
    num_classes = max(p[4] for p in parts)

    k, device = len(recipe.lrs), info.device
    heads = [probe_head(head_name, train, num_classes, s, **head_kwargs) for s in seeds for _ in range(k)]
    stack = ProbeStack(heads, groups=len(seeds)).to(device)
    tokens_of = training_source(stack, train, device)
    batch = min(recipe.batch_size, n)
    backward_of = synced_backward(stack, tokens_of, train.labels, indices, n, batch, info)
    losses = fit_stack(stack, tokens_of, labels, recipe, list(seeds), backward_of=backward_of)
    _same_weights_everywhere(stack, info)
    stack.reading_pooled(False)
    val_correct = _summed(stack_correct(stack, val.tokens.to(device), val.labels), info)
    val_acc = (val_correct / n_val).tolist()
    diverged = diverged_copies(stack)
    results = []
    for g, seed in enumerate(seeds):
        acc = usable_accuracies(val_acc[g * k:(g + 1) * k], diverged[g * k:(g + 1) * k], recipe.lrs, head_name, seed)
        best = int(np.nanargmax(acc))  # first best: the smallest such lr, as in probing.train_probes
        head = stack.heads[g * k + best].cpu().eval()
        test_acc = None if test is None else _accuracy_summed(head, test, sum(p[2] for p in parts), info)
        results.append(ProbeResult(head_name, list(recipe.lrs), acc, recipe.lrs[best], acc[best], test_acc, head,
                                   seed, losses))
    return results


def _same_weights_everywhere(stack: ProbeStack, info: ProcessInfo) -> None:
    """Rank 0's float weights and statistics copied to every process (they agree already, to the last bit or nearly)."""
    if info.world_size == 1:
        return
    tensors = [t for t in stack.state_dict().values() if t.is_floating_point()]
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(_wire_device(info))
    dist.broadcast(flat, 0)
    with torch.no_grad():
        for t, v in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(v.view_as(t))


@torch.no_grad()
def _accuracy_summed(head, tokens: TokenSet, n: int, info: ProcessInfo, batch_size: int = 1024) -> float:
    """One head's accuracy on a split whose parts the processes hold (correct counts summed)."""
    correct = torch.zeros((), dtype=torch.long)
    for i in range(0, len(tokens), batch_size):
        logits = head(tokens.tokens[i:i + batch_size].float())
        correct += int((logits.argmax(-1) == tokens.labels[i:i + batch_size]).sum())
    return int(_summed(correct, info)) / n


# ----------------------------------------------------------------------------- a measurement for the book
@dataclass(frozen=True)
class ProbeProblem:
    """The random probing problem `bench_probe_epoch` times: `images` of `num_tokens` tokens ([cls] + a square grid
    of patches) of width `dim`, in `classes` classes."""

    images: int = 256
    num_tokens: int = 197
    dim: int = 768
    classes: int = 10

    def __post_init__(self) -> None:
        """Refuse sizes that are not whole numbers, or tokens that are not [cls] plus a square grid."""
        whole_number_fields(self, {"images": (2, "BatchNorm trains on batches of 2 or more (256 by default)"),
                                   "num_tokens": (2, "give [cls] plus the patches, e.g. 197 (ViT-B/16)"),
                                   "dim": (1, "give the token width, e.g. 768 (ViT-B)"),
                                   "classes": (1, "give the number of classes, e.g. 10")})
        if self.side ** 2 != self.num_tokens - 1:
            raise SelaggError(f"num_tokens={self.num_tokens} is not 1 + a square number of patches; use e.g. 197 "
                              "(ViT-B/16).")

    @property
    def side(self) -> int:
        """Patches per side of the grid."""
        return int(round((self.num_tokens - 1) ** 0.5))


def bench_probe_epoch(head_name: str = "abmilp", problem: ProbeProblem = ProbeProblem(), lrs: int = 8,
                      batch_size: int = 256, epochs: int = 3, seed: int = 0) -> dict:
    """Seconds per training epoch of a probe sweep (one head, `lrs` learning rates) per GB of float16 tokens read.

    Random tokens (`problem`), one part per process of `distributed.current_process()`, trained as
    `train_probes_distributed` trains them. After one untimed epoch, `epochs` epochs are timed one by
    one and the median is kept (a shared machine makes single epochs slow now and then). An epoch
    reads `images // batch_size` whole global batches. CPU seconds are summed over the processes
    (steadier than wall time on a shared machine; on a GPU they count the host only). Every process
    returns the same row.
    """
    options_object(problem, ProbeProblem, "problem", "ProbeProblem(images=256, num_tokens=197, dim=768)")
    info = current_process()
    whole_number(epochs, "epochs", 1, "time at least one epoch")
    images, num_tokens, dim, classes = problem.images, problem.num_tokens, problem.dim, problem.classes
    side = problem.side
    mine = torch.arange(info.rank, images, info.world_size)
    g = torch.Generator().manual_seed(seed * 1009 + info.rank)
    train = TokenSet(torch.randn(len(mine), num_tokens, dim, generator=g).half(), mine % classes,
                     TokenLayout(True, 0, (side, side)))
    recipe = ProbeRecipe(epochs=1, warmup_epochs=0, batch_size=batch_size,
                         lrs=tuple(0.01 * 10 ** (i / 2) for i in range(lrs)))  # 0.01, 0.03, 0.1, ... as in ProbeRecipe
    batch = min(batch_size, images)
    stack = ProbeStack([probe_head(head_name, train, classes, seed) for _ in range(lrs)]).to(info.device)
    tokens_of = training_source(stack, train, info.device)
    labels = global_labels(train.labels, mine, images, info)
    backward_of = synced_backward(stack, tokens_of, train.labels, mine, images, batch, info)
    walls, cpus = [], []
    for i in range(1 + epochs):
        _summed(torch.zeros(1), info)  # start together
        start, cpu_start = time.perf_counter(), time.process_time()
        fit_stack(stack, tokens_of, labels, recipe, seed + i, backward_of=backward_of)
        if info.device.type == "cuda":
            torch.cuda.synchronize(info.device)
        walls.append(float(_summed(torch.tensor([time.perf_counter() - start]), info, dist.ReduceOp.MAX)))
        cpus.append(float(_summed(torch.tensor([time.process_time() - cpu_start]), info)))
    wall, cpu = float(np.median(walls[1:])), float(np.median(cpus[1:]))
    gb = images // batch * batch * num_tokens * dim * 2 / 1e9
    return {"head": head_name, "lrs": lrs, "processes": info.world_size, "images": images, "num_tokens": num_tokens,
            "dim": dim, "batch_size": batch, "train_gb": gb, "seconds_per_epoch": wall,
            "seconds_per_epoch_per_gb": wall / gb, "cpu_seconds_per_epoch_per_gb": cpu / gb, "device": str(info.device)}
