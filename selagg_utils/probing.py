"""Probes on frozen features: k-NN, linear classifiers, and pooling heads trained on cached tokens.

`train_probe` follows MAE's linear-probing protocol (BatchNorm without affine, then Linear; LARS or
AdamW; linear warm-up then cosine) and trains one copy of the head per learning rate *together*:
every batch is read once and all copies are computed in one batched call (heads that cannot be
batched run one after the other on the same batch), each copy with its own learning rate in its
own optimizer parameter groups, all updated in one multi-tensor step. The learning rate is chosen
on the val split and the chosen head is reported on the test split. `train_probes` adds seeds the
same way, each with its own batches.
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import Lars
from timm.scheduler import CosineLRScheduler

from .aggregation import Aggregator, make_head, negligible_grad_dropped
from .checks import all_finite, first_nonfinite_item, notice, real_number, whole_number
from .errors import SelaggError
from .progress import progress_bar
from .features import TokenSet


def check_features(train: torch.Tensor, test: torch.Tensor) -> None:
    """Raise a SelaggError for empty features or a feature row (image) with NaN or infinity."""
    for split, x in (("train", train), ("test", test)):
        if x.shape[-2] == 0:
            raise SelaggError(f"The {split} features hold no images; pass at least one feature row per split.")
        if not all_finite(x):
            rows = x.reshape(-1, *x.shape[-2:]).isfinite().all(-1).logical_not().any(0)
            raise SelaggError(f"The {split} features of image {int(rows.nonzero()[0, 0])} contain NaN or infinite "
                              "values, which would make the accuracy meaningless; only finite features are "
                              "accepted: extract them again from finite images, or leave that image out.")


def knn_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, num_classes: int | None = None) -> float:
    """Weighted k-NN on cosine similarity (votes exp(sim / T), as in DINO's evaluation)."""
    check_features(train, test)
    whole_number(k, "k", 1, "k-NN votes with at least one neighbour (DINO uses 20)")
    real_number(temperature, "temperature", 0, "votes are exp(similarity / T) with T > 0 (DINO uses 0.07)",
                strictly=True)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1 if num_classes is None else num_classes
    a, b = F.normalize(train.float(), dim=1), F.normalize(test.float(), dim=1)
    sim, idx = (b @ a.T).topk(min(k, len(a)), dim=1)
    votes = torch.zeros(len(b), num_classes).scatter_add_(1, train_labels[idx], (sim / temperature).exp())
    return float((votes.argmax(1) == test_labels).float().mean())


def logistic_probe_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
                            test_labels: torch.Tensor, C: float = 1.0, max_iter: int = 200) -> float:
    """Test accuracy of multinomial logistic regression on standardised features (L2 penalty 1 / (2 C n)).

    The same model as scikit-learn's LogisticRegression(C), fitted with torch's full-batch L-BFGS,
    which is much faster on a laptop CPU.
    """
    check_features(train, test)
    real_number(C, "C", 0, "C is the inverse strength of the L2 penalty, finite and positive (1.0 by default)",
                strictly=True)
    whole_number(max_iter, "max_iter", 1, "L-BFGS needs at least one iteration (200 by default)")
    # Clones: features and labels may come from inference mode, which autograd cannot use.
    x, xt, y = train.double().clone(), test.double().clone(), train_labels.long().clone()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x, xt = (x - mean) / std, (xt - mean) / std
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    linear = torch.nn.Linear(x.shape[1], num_classes, dtype=torch.float64)
    torch.nn.init.zeros_(linear.weight), torch.nn.init.zeros_(linear.bias)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(linear(x), y) + linear.weight.pow(2).sum() / (2 * C * len(x))
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float((linear(xt).argmax(1) == test_labels).double().mean())


def ridge_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                   alpha: float = 1.0, num_classes: int | None = None) -> torch.Tensor:
    """Least-squares linear probe on standardised features, batched over leading dims: (..., n, D) -> (...)."""
    check_features(train, test)
    real_number(alpha, "alpha", 0, "the ridge penalty is finite and not negative (1.0 by default)")
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    train, test = train.double(), test.double()
    mean, std = train.mean(-2, keepdim=True), train.std(-2, keepdim=True).clamp_min(1e-6)
    x, xt = (train - mean) / std, (test - mean) / std
    y = F.one_hot(train_labels, num_classes).double() - 1.0 / num_classes
    gram = x.transpose(-1, -2) @ x + alpha * torch.eye(x.shape[-1], dtype=x.dtype)
    w = torch.linalg.solve(gram, x.transpose(-1, -2) @ y)
    return ((xt @ w).argmax(-1) == test_labels).double().mean(-1).float()


#: Bytes of float64 working copies one chunk of position probes may take (they are made about three times).
POSITION_CHUNK_BYTES = 256 << 20


def position_accuracy(train: TokenSet, test: TokenSet, alpha: float = 1.0, chunk: int | None = None) -> torch.Tensor:
    """Least-squares probe accuracy of every single patch position on its own, as a (rows, cols) map.

    Positions are solved `chunk` at a time; by default as many as fit POSITION_CHUNK_BYTES (16 at most),
    so that a full-scale split never needs a float64 copy of all its patch tokens.
    """
    n = train.patches.shape[1]
    per_position = 3 * 8 * (len(train) + len(test)) * train.dim
    chunk = chunk or max(1, min(16, POSITION_CHUNK_BYTES // per_position))
    accs = [ridge_accuracy(train.patches[:, i:i + chunk].float().transpose(0, 1), train.labels,
                           test.patches[:, i:i + chunk].float().transpose(0, 1), test.labels, alpha,
                           num_classes=max(train.num_classes, test.num_classes))
            for i in range(0, n, chunk)]
    return torch.cat(accs).reshape(train.grid_size)


# ----------------------------------------------------------------------------- heads trained by gradient
OPTIMIZERS = ("lars", "adamw")
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
        if self.optimizer not in OPTIMIZERS:
            raise SelaggError(f"Unknown optimizer {self.optimizer!r}; choose 'lars' (MAE's protocol) or 'adamw'.")
        whole_number(self.epochs, "epochs", 1, "a probe must train for at least one epoch (MAE's protocol uses 90)")
        real_number(self.warmup_epochs, "warmup_epochs", 0, "use 0 for no warm-up (MAE's protocol uses 10)")
        if self.warmup_epochs > self.epochs:
            raise SelaggError(f"warmup_epochs={self.warmup_epochs} is longer than epochs={self.epochs}; the warm-up "
                              "is part of the training, so choose at most as many warm-up epochs as epochs.")
        whole_number(self.batch_size, "batch_size", 2, "BatchNorm needs at least 2 images per batch (MAE uses 256)")
        if isinstance(self.lrs, (str, bytes)) or not hasattr(self.lrs, "__iter__") or len(tuple(self.lrs)) == 0:
            raise SelaggError(f"lrs={self.lrs!r} is not accepted: it must be a non-empty sequence of learning rates, "
                              "e.g. lrs=(0.1, 1.0, 10.0).")
        object.__setattr__(self, "lrs", tuple(self.lrs))
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

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B, classes)."""
        return self.linear(self.bn(self.pool(tokens, mask)[0]))


class ProbeStack(nn.Module):
    """K probe heads computed together; logits (K, B, classes).

    With `groups` = S > 1 the K heads form S consecutive groups (e.g. one per seed), and the tokens
    come as (S, B, T, D): group s trains on its own batch. With S = 1 all heads share (B, T, D).
    """

    def __init__(self, heads: list[ProbeHead], groups: int = 1):
        super().__init__()
        if len(heads) % groups:
            raise SelaggError(f"{len(heads)} heads cannot be split into {groups} equal groups.")
        self.heads = nn.ModuleList(heads)
        self.groups = groups
        self.prepooled = False  # set while training on features pooled in advance

    @classmethod
    def copies(cls, head: ProbeHead, k: int) -> "ProbeStack":
        """K identical copies of one head (to be trained with K learning rates)."""
        return cls([copy.deepcopy(head) for _ in range(k)])

    def pooled(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features of every head, (K, B, D)."""
        first = self.heads[0].pool
        per_group = len(self.heads) // self.groups
        if tokens.ndim == 4:
            if mask is not None:
                raise SelaggError("Grouped training batches take no mask; pass mask=None.")
            s, b = tokens.shape[:2]
            tokens = first.check(tokens.flatten(0, 1), None)[0].reshape(s, b, *tokens.shape[2:])
        else:
            tokens, mask = first.check(tokens, mask)
        if next(first.parameters(), None) is None:  # cls / mean: nothing learned, pool once per batch
            flat = tokens.flatten(0, 1) if tokens.ndim == 4 else tokens
            z = first.pool(flat, mask)[0]
            z = z.reshape(self.groups, -1, z.shape[-1]) if tokens.ndim == 4 else z.expand(self.groups, -1, -1)
            return z.repeat_interleave(per_group, dim=0)
        if getattr(first, "can_stack", lambda: False)():
            return first.pool_stacked([h.pool for h in self.heads], tokens, mask)
        return torch.stack([h.pool.pool(tokens[k // per_group] if tokens.ndim == 4 else tokens, mask)[0]
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

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.prepooled:  # features already pooled: (B, D) shared or (S, B, D) per group
            z = tokens.expand(self.groups, -1, -1) if tokens.ndim == 2 else tokens
            if self.training:
                return negligible_grad_dropped(self.shared_logits(z))
            z = z.repeat_interleave(len(self.heads) // self.groups, dim=0)
        else:
            z = self.pooled(tokens, mask)
        z = self.normalised(z)
        w = torch.stack([h.linear.weight for h in self.heads])
        b = torch.stack([h.linear.bias for h in self.heads])
        return negligible_grad_dropped(torch.baddbmm(b[:, None], z, w.transpose(1, 2)))


class _OneUpdateForAllGroups:
    """Optimizer mixin: groups that share all settings but the learning rate are stepped in one update.

    A learning-rate sweep has two small parameter groups per copy; stepping them one by one costs
    far more in Python than in arithmetic. `_update` gets the settings, the parameters that have a
    gradient, and each one's learning rate.
    """

    _SETTINGS: tuple[str, ...] = ()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        alike: dict[tuple, list[dict]] = {}
        for group in self.param_groups:
            alike.setdefault(tuple(group[key] for key in self._SETTINGS), []).append(group)
        for settings, groups in alike.items():
            pairs = [(p, g["lr"]) for g in groups for p in g["params"] if p.grad is not None]
            if pairs:
                self._update(dict(zip(self._SETTINGS, settings)), [p for p, _ in pairs], [lr for _, lr in pairs])
        return loss


class SweepLars(_OneUpdateForAllGroups, Lars):
    """timm's LARS with the same arithmetic, every tensor with its own group's lr and its own trust ratio."""

    _SETTINGS = ("momentum", "dampening", "weight_decay", "nesterov", "trust_coeff", "eps", "trust_clip",
                 "always_adapt")

    def _update(self, s: dict, params: list[torch.Tensor], lrs: list[float]) -> None:
        grads = [p.grad for p in params]
        if s["weight_decay"] != 0 or s["always_adapt"]:
            w_norm, g_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(grads))
            ratio = s["trust_coeff"] * w_norm / (g_norm + w_norm * s["weight_decay"] + s["eps"])
            ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)  # 1 (no change) if either norm is 0
            if s["trust_clip"]:
                ratio = (ratio / torch.tensor(lrs, dtype=ratio.dtype, device=ratio.device)).clamp(max=1.0)
            if s["weight_decay"]:  # new tensors: p.grad itself is left alone
                grads = torch._foreach_add(grads, params, alpha=s["weight_decay"])
                torch._foreach_mul_(grads, list(ratio.unbind()))
            else:
                grads = torch._foreach_mul(grads, list(ratio.unbind()))
        if s["momentum"] != 0:
            bufs = [self.state[p].get("momentum_buffer") for p in params]
            old = [i for i, buf in enumerate(bufs) if buf is not None]
            if old:
                torch._foreach_mul_([bufs[i] for i in old], s["momentum"])
                torch._foreach_add_([bufs[i] for i in old], [grads[i] for i in old], alpha=1.0 - s["dampening"])
            for i, (p, buf) in enumerate(zip(params, bufs)):
                if buf is None:
                    bufs[i] = self.state[p]["momentum_buffer"] = grads[i].detach().clone()
            grads = torch._foreach_add(grads, bufs, alpha=s["momentum"]) if s["nesterov"] else bufs
        torch._foreach_add_(params, torch._foreach_mul(grads, [-lr for lr in lrs]))


class SweepAdamW(_OneUpdateForAllGroups, torch.optim.AdamW):
    """torch's AdamW with the same arithmetic and state (step, exp_avg, exp_avg_sq), every tensor with its own lr."""

    _SETTINGS = ("betas", "eps", "weight_decay")

    def __init__(self, params, **kwargs):
        if kwargs.get("amsgrad") or kwargs.get("maximize"):
            raise SelaggError("SweepAdamW supports neither amsgrad nor maximize; use torch.optim.AdamW.")
        super().__init__(params, **kwargs)

    def _update(self, s: dict, params: list[torch.Tensor], lrs: list[float]) -> None:
        for p in params:
            if not self.state[p]:
                self.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                     exp_avg_sq=torch.zeros_like(p))
        states = [self.state[p] for p in params]
        steps = [st["step"] for st in states]
        avgs, avg_sqs = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
        grads = [p.grad for p in params]
        (beta1, beta2), eps, weight_decay = s["betas"], s["eps"], s["weight_decay"]
        torch._foreach_add_(steps, 1.0)
        if weight_decay != 0:
            torch._foreach_mul_(params, [1 - lr * weight_decay for lr in lrs])
        torch._foreach_lerp_(avgs, grads, 1 - beta1)
        torch._foreach_mul_(avg_sqs, beta2)
        torch._foreach_addcmul_(avg_sqs, grads, grads, 1 - beta2)
        counts = [float(step) for step in steps]
        denom = torch._foreach_sqrt(avg_sqs)
        torch._foreach_div_(denom, [(1 - beta2 ** n) ** 0.5 for n in counts])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, avgs, denom, [-lr / (1 - beta1 ** n) for lr, n in zip(lrs, counts)])


def make_optimizer(stack: ProbeStack, recipe: ProbeRecipe, lrs: list[float]) -> torch.optim.Optimizer:
    """One parameter group pair per copy (matrices; vectors without decay or LARS adaptation), each with its lr."""
    groups = []
    for head, lr in zip(stack.heads, lrs):
        params = [p for p in head.parameters() if p.requires_grad]
        groups.append({"params": [p for p in params if p.ndim > 1], "lr": lr, "weight_decay": recipe.weight_decay,
                       **({"always_adapt": True} if recipe.optimizer == "lars" else {})})
        groups.append({"params": [p for p in params if p.ndim <= 1], "lr": lr, "weight_decay": 0.0})
    groups = [g for g in groups if g["params"]]
    if recipe.optimizer == "lars":
        return SweepLars(groups, lr=lrs[0], momentum=recipe.momentum)
    if recipe.optimizer == "adamw":
        return SweepAdamW(groups, lr=lrs[0])
    raise SelaggError(f"Unknown optimizer {recipe.optimizer!r}; choose 'lars' (MAE's protocol) or 'adamw'.")


def fit_stack(stack: ProbeStack, tokens_of: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
              recipe: ProbeRecipe, seed: int | list[int] = 0, progress: bool = False,
              lrs: list[float] | None = None) -> list[float]:
    """Train the stack; `tokens_of(indices)` gives the tokens of a batch; returns the mean loss per step.

    `seed` (one per group) seeds each group's batch order; `lrs` (one per head) defaults to the
    recipe's learning rates repeated for every group, scaled by batch / 256.
    """
    seeds = [seed] * stack.groups if isinstance(seed, int) else list(seed)
    n = len(labels)
    bs = min(recipe.batch_size, n)
    per_epoch = n // bs
    total = max(recipe.epochs * per_epoch, recipe.min_steps)
    warmup = round(total * recipe.warmup_epochs / recipe.epochs) if recipe.epochs else 0
    lrs = recipe.scaled_lrs(bs) * stack.groups if lrs is None else lrs
    optimizer = make_optimizer(stack, recipe, lrs)
    schedule = CosineLRScheduler(optimizer, t_initial=max(total - warmup, 1), warmup_t=warmup, warmup_prefix=True,
                                 t_in_epochs=False)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    per_group = len(stack.heads) // stack.groups
    stack.train()
    losses: list[float] = []
    bar = progress_bar(total=total, enabled=progress, desc="training probes", leave=False)
    while len(losses) < total:
        orders = torch.stack([torch.randperm(n, generator=g) for g in generators])
        for i in range(per_epoch):
            if len(losses) == total:
                break
            idx = orders[:, i * bs:(i + 1) * bs]  # (S, B)
            schedule.step_update(len(losses))
            logits = stack(tokens_of(idx[0] if stack.groups == 1 else idx))
            y = labels[idx].to(logits.device).repeat_interleave(per_group, dim=0)  # (K, B)
            # classes in the middle, (K, classes, B): on a CPU, cross-entropy over a dimension with a
            # long inner one runs about twice as fast as over the last dimension of (K * B, classes)
            loss = F.cross_entropy(logits.transpose(1, 2).contiguous(), y, reduction="sum") / bs
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item() / len(stack.heads))
            bar.update()
    bar.close()
    return losses


@torch.no_grad()
def stack_accuracy(stack: ProbeStack, tokens: torch.Tensor, labels: torch.Tensor,
                   batch_size: int = 1024) -> list[float]:
    """Accuracy of every copy, in eval mode."""
    stack.eval()
    correct = torch.zeros(len(stack.heads))
    for i in range(0, len(labels), batch_size):
        logits = stack(tokens[i:i + batch_size].float())
        correct += (logits.argmax(-1).cpu() == labels[i:i + batch_size]).sum(1)
    return (correct / len(labels)).tolist()


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


def new_head(head_name: str, tokens: TokenSet, num_classes: int, seed: int, **head_kwargs) -> ProbeHead:
    """A freshly initialised probe head for these tokens (initialisation depends on the seed only)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ProbeHead(make_head(head_name, **{**tokens.head_kwargs(), **head_kwargs}), num_classes)


def training_source(stack: "ProbeStack", train: TokenSet, device: str | torch.device,
                    max_bytes: int = 2 ** 31) -> Callable[[torch.Tensor], torch.Tensor]:
    """Batches for training: pooled once when the head learns nothing (cls, mean), else float tokens."""
    pool = stack.heads[0].pool
    if next(pool.parameters(), None) is None:
        with torch.no_grad():
            pooled = torch.cat([pool(train.tokens[i:i + 1024].float())[0] for i in range(0, len(train), 1024)])
        stack.prepooled = True
        pooled = pooled.to(device)
        return lambda idx: pooled[idx.to(device)]
    if train.tokens.numel() * 4 <= max_bytes:  # small enough: convert to float32 once
        tokens = train.tokens.to(device).float()
        return lambda idx: tokens[idx.to(device)]
    if torch.device(device).type == "cuda" and train.tokens.numel() * 2 <= 4 * max_bytes:  # float16 on the GPU
        tokens = train.tokens.to(device)
        return lambda idx: tokens[idx.to(device)].float()
    return lambda idx: train.tokens[idx].to(device).float()


def train_probes(head_name: str, train: TokenSet, val: TokenSet, test: TokenSet | None = None,
                 recipe: ProbeRecipe = ProbeRecipe(), seeds: tuple[int, ...] = (0, 1, 2), progress: bool = False,
                 device: str | torch.device = "cpu", **head_kwargs) -> list[ProbeResult]:
    """One lr sweep per seed, all trained together; each seed picks its lr on val and reports test.

    A seed sets both the head's initialisation and its batch order, so the spread over seeds is the
    spread one would get from separate runs.
    """
    seeds = checked_seeds(seeds)
    check_probe_inputs(recipe, train, val, test)
    num_classes = max(train.num_classes, val.num_classes)
    k = len(recipe.lrs)
    heads = [copy.deepcopy(new_head(head_name, train, num_classes, s, **head_kwargs)) for s in seeds for _ in range(k)]
    stack = ProbeStack(heads, groups=len(seeds)).to(device)
    losses = fit_stack(stack, training_source(stack, train, device), train.labels, recipe, list(seeds), progress)
    stack.prepooled = False
    val_acc = stack_accuracy(stack, val.tokens.to(device), val.labels)
    diverged = diverged_copies(stack)
    results = []
    for g, seed in enumerate(seeds):
        acc = usable_accuracies(val_acc[g * k:(g + 1) * k], diverged[g * k:(g + 1) * k], recipe.lrs, head_name, seed)
        best = int(np.nanargmax(acc))  # first best: the smallest such lr
        head = stack.heads[g * k + best].cpu().eval()
        test_acc = probe_accuracy(head, test) if test is not None else None
        results.append(ProbeResult(head_name, list(recipe.lrs), acc, recipe.lrs[best], acc[best], test_acc, head,
                                   seed, losses))
    return results


def checked_seeds(seeds) -> tuple[int, ...]:
    """The seeds as a tuple of whole numbers >= 0, or a SelaggError."""
    seeds = (seeds,) if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool) else seeds
    if not hasattr(seeds, "__iter__") or len(tuple(seeds)) == 0:
        raise SelaggError(f"seeds={seeds!r} is not accepted: give a non-empty sequence of whole numbers, "
                          "e.g. (0, 1, 2).")
    return tuple(whole_number(s, "seed", 0, "seeds are whole numbers such as (0, 1, 2)") for s in seeds)


def check_probe_inputs(recipe: ProbeRecipe, train: TokenSet, val: TokenSet, test: TokenSet | None) -> None:
    """Refuse splits that cannot train or score a probe: too few images, mismatched or non-finite tokens."""
    if not isinstance(recipe, ProbeRecipe):
        raise SelaggError(f"recipe must be a ProbeRecipe, got a {type(recipe).__name__}; build one with "
                          "probing.ProbeRecipe(epochs=..., lrs=(...)).")
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


def diverged_copies(stack: ProbeStack) -> list[bool]:
    """For each copy in a stack, whether training left NaN or infinite weights or statistics."""
    return [not all(all_finite(t) for t in [*head.parameters(), *head.buffers()]) for head in stack.heads]


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


def train_probe(head_name: str, train: TokenSet, val: TokenSet, test: TokenSet | None = None,
                recipe: ProbeRecipe = ProbeRecipe(), seed: int = 0, progress: bool = False,
                device: str | torch.device = "cpu", **head_kwargs) -> ProbeResult:
    """Train a head at every lr of the recipe together on cached tokens; pick the lr on val, report test."""
    return train_probes(head_name, train, val, test, recipe, (seed,), progress, device, **head_kwargs)[0]


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


def low_shot_accuracy(head_name: str, train: TokenSet, val: TokenSet, test: TokenSet, shots: int, draws: int = 3,
                      recipe: ProbeRecipe = ProbeRecipe(), seed: int = 0, min_steps: int = 200,
                      device: str | torch.device = "cpu", **head_kwargs) -> list[float]:
    """Test accuracy of a head trained on `shots` images per class, for each of `draws` random draws.

    Tiny training sets make few steps per epoch, so training runs at least `min_steps` steps.
    """
    recipe = replace(recipe, min_steps=max(recipe.min_steps, min_steps))
    results = []
    for d, index in enumerate(low_shot_indices(train.labels, shots, draws, seed)):
        results.append(train_probe(head_name, train.subset(index), val, test, recipe, seed + d, device=device,
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

