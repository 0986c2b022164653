"""The offline lab dataset, `cluttered-digits`, and an endless stream of fresh batches of it.

It is built from scikit-learn's bundled 8x8 handwritten digits, so it needs no network. Each 32x32
grayscale image holds one digit (upscaled to 16x16, placed at random) among small crops of other
digits ("clutter") that never touch it, plus a little Gaussian noise. With patch size 4 the image is
an 8x8 grid of 64 patches; the digit covers about a quarter of them, so a model that wants the label
has to *select* the right patches. Each image comes with its object mask: the patches (gh, gw) that
overlap the bounding box of the digit's ink.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import SelaggError
from .subsets import check_split

__all__ = ["DigitsRecipe", "DEFAULT_SIZES", "ClutteredDigits", "source_indices", "render_cluttered_digits",
           "cluttered_digits", "DigitStream"]


@dataclass(frozen=True)
class DigitsRecipe:
    """Everything that determines a cluttered-digits split (it keys the feature cache too)."""

    canvas: int = 32
    digit_size: int = 16
    patch_size: int = 4
    clutter_min: int = 4
    clutter_max: int = 6
    clutter_sizes: tuple[int, ...] = (4, 6)
    clutter_gap: int = 1
    noise_std: float = 0.03
    ink_threshold: float = 0.25
    source_split: tuple[int, int, int] = (1200, 150, 447)
    source_seed: int = 0
    version: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_SIZES = {"train": 10_000, "val": 2_000, "test": 2_000}


@dataclass
class ClutteredDigits(Dataset):
    """A materialised split: images (N,1,H,W) float32, labels (N,), object masks (N,gh,gw) bool."""

    images: torch.Tensor
    labels: torch.Tensor
    object_masks: torch.Tensor
    split: str
    seed: int
    recipe: DigitsRecipe = field(default_factory=DigitsRecipe)
    classes: tuple[str, ...] = tuple(str(d) for d in range(10))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def with_object_masks(self) -> torch.utils.data.TensorDataset:
        """The same images as (image, label, object mask) triples."""
        return torch.utils.data.TensorDataset(self.images, self.labels, self.object_masks)

    @property
    def key(self) -> dict:
        """What identifies this split's content (used for cache keys)."""
        return {"name": "cluttered-digits", "split": self.split, "seed": self.seed,
                "n_images": len(self), "recipe": self.recipe.to_dict()}


@functools.lru_cache(maxsize=4)
def _upscaled_sources(size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 scikit-learn digits as (M, size, size) floats in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    big = torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    return big[:, 0].clamp(0, 1).numpy(), digits.target.astype(np.int64)


def source_indices(split: str, recipe: DigitsRecipe = DigitsRecipe()) -> np.ndarray:
    """Indices of the scikit-learn digits a split draws from; the three splits are disjoint."""
    check_split(split)
    order = np.random.default_rng(recipe.source_seed).permutation(1797)
    n_train, n_val, n_test = recipe.source_split
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val),
              "test": (n_train + n_val, n_train + n_val + n_test)}
    lo, hi = bounds[split]
    return np.sort(order[lo:hi])


def _paste_max(canvas: np.ndarray, stamps: np.ndarray, top: np.ndarray, left: np.ndarray) -> None:
    """canvas[i, top_i:top_i+s, left_i:left_i+s] = max(canvas, stamps[i]) for every image i."""
    n, s, _ = stamps.shape
    rows = top[:, None, None] + np.arange(s)[None, :, None]
    cols = left[:, None, None] + np.arange(s)[None, None, :]
    idx = np.arange(n)[:, None, None]
    canvas[idx, rows, cols] = np.maximum(canvas[idx, rows, cols], stamps)


def render_cluttered_digits(sources: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator,
                            recipe: DigitsRecipe = DigitsRecipe()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw n images from the given source digits: (images (n,H,W), labels (n,), masks (n,gh,gw))."""
    c, d, p = recipe.canvas, recipe.digit_size, recipe.patch_size
    canvas = np.zeros((n, c, c), np.float32)
    pick = rng.integers(0, len(sources), n)
    digit = sources[pick]
    top, left = rng.integers(0, c - d + 1, n), rng.integers(0, c - d + 1, n)
    _paste_max(canvas, digit, top, left)

    # Clutter: crops of other digits, placed outside the digit's box (grown by clutter_gap).
    n_clutter = rng.integers(recipe.clutter_min, recipe.clutter_max + 1, n)
    g = recipe.clutter_gap
    for k in range(recipe.clutter_max):
        s = int(rng.choice(recipe.clutter_sizes))
        donor = sources[rng.integers(0, len(sources), n)]
        oy, ox = rng.integers(0, d - s + 1, n), rng.integers(0, d - s + 1, n)
        crops = donor[np.arange(n)[:, None, None], oy[:, None, None] + np.arange(s)[None, :, None],
                      ox[:, None, None] + np.arange(s)[None, None, :]]
        # 16 candidate places per image; keep the first that stays clear of the digit.
        cy, cx = rng.integers(0, c - s + 1, (n, 16)), rng.integers(0, c - s + 1, (n, 16))
        clear = ((cy + s <= top[:, None] - g) | (cy >= top[:, None] + d + g)
                 | (cx + s <= left[:, None] - g) | (cx >= left[:, None] + d + g))
        first = clear.argmax(axis=1)
        ok = clear[np.arange(n), first] & (k < n_clutter)
        crops = crops * ok[:, None, None]
        _paste_max(canvas, crops, cy[np.arange(n), first], cx[np.arange(n), first])

    canvas += rng.normal(0.0, recipe.noise_std, canvas.shape).astype(np.float32)
    masks = _object_masks(digit, top, left, recipe)
    return canvas, labels[pick], masks


def _object_masks(digit: np.ndarray, top: np.ndarray, left: np.ndarray, recipe: DigitsRecipe) -> np.ndarray:
    """Patches that overlap the bounding box of each digit's ink, as (n, gh, gw) booleans."""
    ink = digit > recipe.ink_threshold
    rows, cols = ink.any(axis=2), ink.any(axis=1)
    y0 = top + rows.argmax(axis=1)
    y1 = top + recipe.digit_size - 1 - rows[:, ::-1].argmax(axis=1)
    x0 = left + cols.argmax(axis=1)
    x1 = left + recipe.digit_size - 1 - cols[:, ::-1].argmax(axis=1)
    grid = recipe.canvas // recipe.patch_size
    cells = np.arange(grid) * recipe.patch_size
    in_rows = (cells[None] + recipe.patch_size > y0[:, None]) & (cells[None] <= y1[:, None])
    in_cols = (cells[None] + recipe.patch_size > x0[:, None]) & (cells[None] <= x1[:, None])
    return in_rows[:, :, None] & in_cols[:, None, :]


_SPLIT_OFFSET = {"train": 0, "val": 1, "test": 2}


def cluttered_digits(split: str, n_images: int | None = None, seed: int = 0,
                     recipe: DigitsRecipe = DigitsRecipe()) -> ClutteredDigits:
    """One split of the embedded dataset, identical for the same (split, n_images, seed, recipe)."""
    check_split(split)
    n = DEFAULT_SIZES[split] if n_images is None else int(n_images)
    if n <= 0:
        raise SelaggError(f"n_images must be positive, got {n_images}.")
    if recipe.canvas % recipe.patch_size:
        raise SelaggError(f"Canvas size {recipe.canvas} is not divisible by patch size {recipe.patch_size}.")
    sources, labels = _upscaled_sources(recipe.digit_size)
    idx = source_indices(split, recipe)
    rng = np.random.default_rng([seed, _SPLIT_OFFSET[split], 2024])
    images, y, masks = render_cluttered_digits(sources[idx], labels[idx], n, rng, recipe)
    return ClutteredDigits(torch.from_numpy(images)[:, None], torch.from_numpy(y),
                           torch.from_numpy(masks), split, seed, recipe)


class DigitStream:
    """Endless fresh batches from the train sources (new placements and clutter every batch)."""

    def __init__(self, batch_size: int, seed: int = 0, split: str = "train",
                 recipe: DigitsRecipe = DigitsRecipe()):
        sources, labels = _upscaled_sources(recipe.digit_size)
        idx = source_indices(split, recipe)
        self.sources, self.labels, self.recipe = sources[idx], labels[idx], recipe
        self.batch_size, self.rng = batch_size, np.random.default_rng([seed, 99])

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, _ = render_cluttered_digits(self.sources, self.labels, self.batch_size, self.rng, self.recipe)
        return torch.from_numpy(images)[:, None], torch.from_numpy(labels)
