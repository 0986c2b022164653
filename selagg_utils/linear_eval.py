"""Evaluations without a training loop: k-NN, logistic regression and least squares on frozen features.

Each returns the test accuracy of one probe (or, for least squares, of many probes solved together)
and refuses empty or non-finite features rather than print a chance-level number.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import SelaggError, all_finite, real_number, whole_number
from .features import TokenSet, check_same_source

__all__ = ["knn_accuracy", "logistic_probe_accuracy", "ridge_accuracy", "position_accuracy"]


def check_features(train: torch.Tensor, test: torch.Tensor) -> None:
    """Raise a SelaggError for empty features, features of two backbones, or a feature row (image) with NaN or
    infinity."""
    check_same_source({"train": train, "test": test}, "features")
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
    check_same_source({"train": train, "test": test})
    n = train.patches.shape[1]
    per_position = 3 * 8 * (len(train) + len(test)) * train.dim
    chunk = chunk or max(1, min(16, POSITION_CHUNK_BYTES // per_position))
    accs = [ridge_accuracy(train.patches[:, i:i + chunk].float().transpose(0, 1), train.labels,
                           test.patches[:, i:i + chunk].float().transpose(0, 1), test.labels, alpha,
                           num_classes=max(train.num_classes, test.num_classes))
            for i in range(0, n, chunk)]
    return torch.cat(accs).reshape(train.grid_size)
