"""Which images: the three split names, and seeded class-stratified subsets that see every class."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .checks import SelaggError

__all__ = ["SPLITS", "example_indices"]

SPLITS = ("train", "val", "test")


def check_split(split: str) -> None:
    """Raise a SelaggError unless `split` is one of SPLITS."""
    if split not in SPLITS:
        raise SelaggError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")


# Each seeded draw has its own random stream, so that changing one never changes another.
CARVE_STREAM, _CAP_STREAM, _EXAMPLES_STREAM = 1, 2, 3


def labels_of(dataset: Dataset) -> np.ndarray:
    """The class label of every item as an (N,) int64 array, read from `targets`/`labels` without loading images."""
    if isinstance(dataset, torch.utils.data.Subset):
        return labels_of(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    stored = getattr(dataset, "targets", None)
    if stored is None:
        stored = getattr(dataset, "labels", None)
    if stored is None and isinstance(dataset, torch.utils.data.TensorDataset) and len(dataset.tensors) > 1:
        stored = dataset.tensors[1]
    if stored is None:  # a plain dataset: only its items say (this loads every image once)
        try:
            stored = [int(dataset[i][1]) for i in range(len(dataset))]
        except (TypeError, IndexError, ValueError, KeyError):
            raise SelaggError(f"Cannot read class labels from a {type(dataset).__name__}: expected items "
                              "(image, label) or a `targets` or `labels` attribute; add one of them.") from None
    labels = np.asarray(stored.detach().cpu() if torch.is_tensor(stored) else stored)
    if labels.ndim != 1 or len(labels) != len(dataset) or not np.issubdtype(labels.dtype, np.integer):
        raise SelaggError(f"The labels of this {type(dataset).__name__} are not one whole number per item "
                          f"(got shape {labels.shape}, dtype {labels.dtype}, for {len(dataset)} items); "
                          "give it integer class labels.")
    return labels.astype(np.int64)


def class_quotas(counts: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """How many of n items each class gets: floor or ceil of n * count / total, unseen classes first for a ceiling."""
    counts = np.asarray(counts, dtype=np.int64)
    floors, remainders = np.divmod(n * counts, int(counts.sum()))  # exact integer shares, no rounding error
    extra = n - int(floors.sum())
    # A ceiling goes to classes whose share is not whole: classes that would get none first, then the
    # largest remainders, ties at random. There are always enough of them (the remainders sum to extra).
    order = np.lexsort((rng.random(len(counts)), -remainders, floors > 0))
    floors[order[remainders[order] > 0][:extra]] += 1
    return floors


def stratified_positions(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n positions into `labels`, drawn at random within each class in proportion to its size, classes interleaved."""
    classes, inverse, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    quotas = class_quotas(counts, n, rng)
    turn = rng.permutation(len(classes))
    picks, keys, ties = [], [], []
    for k, quota in enumerate(quotas):
        if quota:
            picks.append(rng.choice(np.flatnonzero(inverse == k), size=quota, replace=False))
            keys.append((np.arange(quota) + 0.5) / quota)  # a class's j-th pick goes j/quota of the way along
            ties.append(np.full(quota, turn[k]))
    picks, keys, ties = (np.concatenate(a) for a in (picks, keys, ties))
    return picks[np.lexsort((ties, keys))]


def _checked_count(value, name: str, available: int, what: str) -> int:
    """`value` as an int between 1 and `available`, else a SelaggError."""
    from .checks import whole_number

    count = whole_number(value, name, 1, f"ask for between 1 and {available} {what}")
    if count > available:
        raise SelaggError(f"{name}={count} is not accepted: the dataset holds only {available} images; ask for at "
                          f"most {available} {what}.")
    return count


def example_indices(dataset: Dataset, n: int, seed: int = 0) -> list[int]:
    """n indices of a dataset for a gallery: drawn at random (seeded) within each class, classes interleaved."""
    count = _checked_count(n, "n", len(dataset), "examples")
    rng = np.random.default_rng([seed, _EXAMPLES_STREAM])
    return stratified_positions(labels_of(dataset), count, rng).tolist()
