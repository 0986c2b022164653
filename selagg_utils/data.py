"""Datasets: the offline lab `cluttered-digits`, and the registry `load_dataset` reads.

The lab is built from scikit-learn's bundled 8x8 handwritten digits, so it needs no network. Each
32x32 grayscale image holds one digit (upscaled to 16x16, placed at random) among small crops of
other digits ("clutter") that never touch it, plus a little noise. With 4x4 patches the image is an
8x8 grid; the digit covers about a quarter of it, so a model that wants the label has to *select*
the right patches. Each image comes with its object mask: the patches that overlap the digit's ink.
`imagenette` and `imagefolder:<path>` are image folders (the engine room `imagenette`).
"""
from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from .checks import SelaggError
from .subsets import check_split

__all__ = ["DigitsRecipe", "source_indices", "cluttered_digits", "DigitStream", "REGISTRY", "load_dataset",
           "load_split"]

if TYPE_CHECKING:
    from .config import ScaleSettings


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


# ----------------------------------------------------------------------------- the registry
def _imagenette(split: str, root: str | os.PathLike | None = None, image_size: int | None = None,
                download: bool = True, data_config: dict | None = None, max_images: int | None = None,
                seed: int = 0) -> Dataset:
    """`imagenette.folders.imagenette`, imported when first asked for (the download is an engine room)."""
    from .imagenette.folders import imagenette
    return imagenette(split, root, image_size, download, data_config, max_images, seed)


def _image_folder(root: str | os.PathLike, split: str, image_size: int | None = None, val_fraction: float = 0.1,
                  seed: int = 0, data_config: dict | None = None, max_images: int | None = None) -> Dataset:
    """`imagenette.folders.image_folder`, imported when first asked for."""
    from .imagenette.folders import image_folder
    return image_folder(root, split, image_size, val_fraction, seed, data_config, max_images)


def _cluttered_digits_split(split: str, n_images: int | None = None, seed: int = 0,
                            recipe: DigitsRecipe = DigitsRecipe(), max_images: int | None = None) -> ClutteredDigits:
    """cluttered_digits for load_dataset, refusing max_images (this dataset is drawn to the size asked)."""
    if max_images is not None:
        raise SelaggError(f"cluttered-digits is drawn to the size you ask rather than cut from a fixed split: pass "
                          f"n_images={max_images} instead of max_images={max_images}.")
    return cluttered_digits(split, n_images=n_images, seed=seed, recipe=recipe)


@dataclass(frozen=True)
class DatasetSource:
    """A registry entry: the function that builds a split, what it is, and whether its name takes a path."""

    build: Callable[..., Dataset]
    about: str
    takes_path: bool = False

    @property
    def options(self) -> tuple[str, ...]:
        """The keyword arguments `build` accepts besides the split (and the path)."""
        skip = {"split", "root"} if self.takes_path else {"split"}
        return tuple(p for p in inspect.signature(self.build).parameters if p not in skip)


#: Every dataset `load_dataset` knows, by name; a source that takes a path is named "<name>:<path>".
REGISTRY: dict[str, DatasetSource] = {
    "cluttered-digits": DatasetSource(_cluttered_digits_split, "offline 32x32 digits among clutter, drawn to n_images"),
    "imagenette": DatasetSource(_imagenette, "10 ImageNet classes at 160 px, downloaded once (md5 checked) into "
                                            "$SELAGG_DATA"),
    "imagefolder": DatasetSource(_image_folder, "your own <path>/train/<class>/* and <path>/val/<class>/*",
                                 takes_path=True),
}


def available_datasets() -> dict[str, str]:
    """Each name load_dataset accepts ('imagefolder:<path>' style for sources that take a path) and what it is."""
    return {f"{name}:<path>" if source.takes_path else name: source.about for name, source in REGISTRY.items()}


#: The names load_dataset accepts at import time (kept for code that imports it; the registry is the source).
DATASETS = tuple(available_datasets())


def load_dataset(name: str, split: str, **kwargs) -> Dataset:
    """A dataset split by registry name: 'cluttered-digits' (offline), 'imagenette', or 'imagefolder:<path>'."""
    key, _, path = str(name).partition(":")
    source = REGISTRY.get(key)
    if source is None or source.takes_path != bool(path):
        hint = f" ({key} needs a path: '{key}:<path>')" if source is not None and source.takes_path else ""
        raise SelaggError(f"Unknown dataset {name!r}{hint}; choose one of {', '.join(available_datasets())}.")
    unknown = sorted(set(kwargs) - set(source.options))
    if unknown:
        raise SelaggError(f"{key} does not take {', '.join(unknown)}; it takes {', '.join(source.options)}.")
    return source.build(path, split, **kwargs) if source.takes_path else source.build(split, **kwargs)


def load_split(settings: ScaleSettings, split: str, data_config: dict | None = None, seed: int = 0) -> Dataset:
    """A split of a scale's dataset at its sizes (n_train for train, n_eval otherwise), read as `data_config` says."""
    source = REGISTRY.get(str(settings.dataset).partition(":")[0])
    if data_config is not None and source is not None and "data_config" not in source.options:
        raise SelaggError(f"{settings.dataset} is read as stored and takes no data_config (one was given, for a "
                          "checkpoint's images); use this scale's own backbones, or a dataset of images such as "
                          "imagenette.")
    n = settings.n_train if split == "train" else settings.n_eval
    size = "n_images" if source is not None and "n_images" in source.options else "max_images"
    options = {size: n, "seed": seed, **({"data_config": data_config} if data_config is not None else {})}
    return load_dataset(settings.dataset, split, **options)
