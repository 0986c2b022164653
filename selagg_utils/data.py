"""Datasets: the offline `cluttered-digits` lab and full-scale image folders.

At full scale (Imagenette, your own image folders) each split goes through the eval transform of the
checkpoint (`data_config`, from `model_data_config(model)`), may be capped to a seeded class-stratified
subset (`max_images`), and comes back displayable with `displayable`. `load_dataset` reads
the names it accepts from `REGISTRY`.

The embedded dataset is built from scikit-learn's bundled 8x8 handwritten digits, so it needs no
network. Each 32x32 grayscale image holds one digit (upscaled to 16x16, placed at random) among
small crops of other digits ("clutter") that never touch it, plus a little Gaussian noise. With
patch size 4 the image is an 8x8 grid of 64 patches; the digit covers about a quarter of them,
so a model that wants the label has to *select* the right patches.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import SelaggError

__all__ = ["SPLITS", "DigitsRecipe", "DEFAULT_SIZES", "ClutteredDigits", "source_indices", "render_cluttered_digits",
           "cluttered_digits", "DigitStream", "labels_of", "class_quotas", "stratified_positions",
           "stratified_subset", "example_indices", "DATA_CONFIG_KEYS", "default_data_config", "model_data_config",
           "resolved_data_config", "eval_transform", "normalization", "displayable", "rgb_image",
           "checked_image_folder", "image_folder", "IMAGENETTE_URL", "IMAGENETTE_MD5", "IMAGENETTE_FOLDER",
           "data_root", "file_md5", "imagenette_archive", "imagenette_folder", "imagenette", "DatasetSource",
           "REGISTRY", "available_datasets", "DATASETS", "load_dataset", "load_split"]

if TYPE_CHECKING:
    from .config import ScaleSettings

SPLITS = ("train", "val", "test")


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
    _check_split(split)
    order = np.random.default_rng(recipe.source_seed).permutation(1797)
    n_train, n_val, n_test = recipe.source_split
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val),
              "test": (n_train + n_val, n_train + n_val + n_test)}
    lo, hi = bounds[split]
    return np.sort(order[lo:hi])


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise SelaggError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")


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
    _check_split(split)
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


# ----------------------------------------------------------------------------- subsets that see every class
# Each seeded draw has its own random stream, so that changing one never changes another.
_CARVE_STREAM, _CAP_STREAM, _EXAMPLES_STREAM = 1, 2, 3


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


def _subset_of_base(dataset: Dataset, positions: list[int]) -> torch.utils.data.Subset:
    """A one-level Subset of the dataset's base (under any Subset wrappers) holding the given positions, in order."""
    indices = [int(p) for p in positions]
    base = dataset
    while isinstance(base, torch.utils.data.Subset):
        indices = [int(base.indices[i]) for i in indices]
        base = base.dataset
    subset = torch.utils.data.Subset(base, indices)
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        subset.classes = classes
    return subset


def stratified_subset(dataset: Dataset, max_images: int | None, seed: int = 0) -> Dataset:
    """At most max_images items: the dataset itself when it holds no more, else a seeded class-stratified Subset."""
    if max_images is None:
        return dataset
    from .checks import whole_number

    cap = whole_number(max_images, "max_images", 1, "give a positive number of images per split, or None for the "
                       "whole split")
    if cap >= len(dataset):
        return dataset
    positions = stratified_positions(labels_of(dataset), cap, np.random.default_rng([seed, _CAP_STREAM]))
    return _subset_of_base(dataset, positions.tolist())


def example_indices(dataset: Dataset, n: int, seed: int = 0) -> list[int]:
    """n indices of a dataset for a gallery: drawn at random (seeded) within each class, classes interleaved."""
    count = _checked_count(n, "n", len(dataset), "examples")
    rng = np.random.default_rng([seed, _EXAMPLES_STREAM])
    return stratified_positions(labels_of(dataset), count, rng).tolist()


# ----------------------------------------------------------------------------- transforms and display
#: The keys of the dict `timm.data.resolve_model_data_config(model)` returns (crop_mode is optional).
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def default_data_config(image_size: int = 224) -> dict:
    """The eval config used without a model's: ImageNet statistics, bilinear, crop 0.875 from 224 px up, none below."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return {"input_size": (3, image_size, image_size), "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "crop_pct": 1.0 if image_size < 224 else 0.875, "crop_mode": "center"}


def model_data_config(model: torch.nn.Module) -> dict:
    """timm's data config for a model, with the input size it was built at (DINOv2 built at 224 gets 224, not 518)."""
    from timm.data import resolve_model_data_config

    config = dict(resolve_model_data_config(model))
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if built is not None:
        config["input_size"] = (config["input_size"][0], *tuple(built))
    return config


def resolved_data_config(data_config: dict | None = None, image_size: int | None = None) -> dict:
    """The eval config to use: the given one (image_size, if given, replacing its input size) or the default."""
    from .checks import whole_number

    if image_size is not None:
        image_size = whole_number(image_size, "image_size", 1, "give the side in pixels the model expects, e.g. 224")
    if data_config is None:
        return default_data_config(224 if image_size is None else image_size)
    if not isinstance(data_config, dict):
        raise SelaggError(f"data_config must be a dict like timm.data.resolve_model_data_config(model) returns, got a "
                          f"{type(data_config).__name__}; pass that dict or None for the default.")
    unknown = sorted(set(data_config) - set(DATA_CONFIG_KEYS))
    missing = [k for k in DATA_CONFIG_KEYS[:-1] if k not in data_config]
    if unknown or missing:
        raise SelaggError(f"data_config {'has unknown keys ' + ', '.join(unknown) if unknown else ''}"
                          f"{' and ' if unknown and missing else ''}{'lacks ' + ', '.join(missing) if missing else ''}"
                          f": it needs {', '.join(DATA_CONFIG_KEYS)} (crop_mode optional); pass "
                          "timm.data.resolve_model_data_config(model) or data.model_data_config(model).")
    config = dict(data_config)
    size = config["input_size"]
    if not (isinstance(size, (tuple, list)) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size)):
        raise SelaggError(f"data_config['input_size']={size!r} is not accepted: it must be (channels, height, width), "
                          "e.g. (3, 224, 224).")
    if image_size is not None:
        config["input_size"] = (size[0], image_size, image_size)
    return config


def eval_transform(data_config: dict | None = None, image_size: int | None = None):
    """timm's eval transform (resize, centre crop, tensor, normalise) for a data config, or the default one."""
    from timm.data import create_transform

    return create_transform(**resolved_data_config(data_config, image_size), is_training=False)


def _base_dataset(dataset: Dataset) -> Dataset:
    """The dataset under any Subset wrappers."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


def _transform_steps(transform) -> list:
    """The steps of a transform, with (nested) Compose flattened."""
    inner = getattr(transform, "transforms", None)
    if isinstance(inner, (list, tuple)):
        return [step for t in inner for step in _transform_steps(t)]
    return [transform]


def normalization(dataset: Dataset) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The per-channel (mean, std) a dataset's transform normalises images with; None when it does not normalise."""
    transform = getattr(_base_dataset(dataset), "transform", None)
    if transform is None:
        return None  # tensors as stored (cluttered-digits: values in [0, 1] plus a little noise)
    steps = _transform_steps(transform)
    unknown = [type(s).__name__ for s in steps  # a Lambda may do anything; so may a step of another library
               if type(s).__name__ == "Lambda" or not type(s).__module__.startswith(("torchvision.", "timm."))]
    if unknown:
        raise SelaggError(f"Cannot tell how the transform step {unknown[0]} normalises images (only torchvision's "
                          "and timm's steps are read); pass the statistics: displayable(images, dataset, stats=(mean, "
                          "std)).")
    found = [s for s in steps if type(s).__name__ == "Normalize" and hasattr(s, "mean") and hasattr(s, "std")]
    if len(found) > 1:
        raise SelaggError(f"The dataset's transform normalises {len(found)} times, which this function does not undo; "
                          "pass the statistics: displayable(images, dataset, stats=(mean, std)).")
    if not found:
        return None
    return _floats(found[0].mean), _floats(found[0].std)


def _floats(values) -> tuple[float, ...]:
    """A sequence or tensor of numbers as a flat tuple of floats."""
    return tuple(float(x) for x in torch.as_tensor(values, dtype=torch.float64).reshape(-1))


def displayable(images: torch.Tensor, dataset: Dataset,
                stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> torch.Tensor:
    """A batch (B, C, H, W) of a dataset's images as floats (B, C, H, W) in [0, 1]: de-normalised, then clamped."""
    from .checks import check_finite_items

    if not torch.is_tensor(images) or images.ndim != 4:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise SelaggError(f"displayable takes a batch of image tensors (B, C, H, W), got {shape}; for one image pass "
                          "image[None].")
    x = images.detach().cpu()
    x = x.float() if x.is_floating_point() else x.float() / float(torch.iinfo(x.dtype).max)
    check_finite_items(x, "Image", remedy="look at how this batch was made")
    stats = normalization(dataset) if stats is None else stats
    if stats is not None:
        mean, std = (torch.as_tensor(v, dtype=torch.float32).reshape(-1) for v in stats)
        if len(mean) not in (1, x.shape[1]) or len(std) not in (1, x.shape[1]):
            raise SelaggError(f"The statistics have {len(mean)} means and {len(std)} standard deviations for images "
                              f"with {x.shape[1]} channels; give one per channel (or one for all).")
        x = x * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)
    return x.clamp(0, 1)


# ----------------------------------------------------------------------------- image folders
def rgb_image(path: str):
    """The image file at `path` as an RGB PIL image, or a SelaggError naming the file when it cannot be read."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise SelaggError(f"Could not read {path} as an image ({type(err).__name__}: {err}); remove or replace that "
                          "file and run again.") from None


def _class_folders(folder: Path) -> list[str]:
    """The class folder names ImageFolder would find in `folder` (every sub-folder, sorted)."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def _empty_class_folders(folder: Path, classes: list[str]) -> list[str]:
    """The class folders that hold no file ImageFolder accepts as an image."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    def holds_images(cls: str) -> bool:
        return any(name.lower().endswith(IMG_EXTENSIONS)
                   for _, _, names in os.walk(folder / cls, followlinks=True) for name in names)
    return [c for c in classes if not holds_images(c)]


def checked_image_folder(folder: Path, transform=None):
    """An ImageFolder over `folder` whose loader names unreadable files; refused when it cannot feed a probe."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes = _class_folders(folder)
    if not classes:
        raise SelaggError(f"{folder} holds no class folders: an image folder needs {folder}/<class>/<image> with one "
                          "folder per class, at least two classes.")
    if len(classes) == 1:
        raise SelaggError(f"{folder} holds a single class folder ({classes[0]!r}): a classification probe needs at "
                          "least two classes; add one folder of images per class.")
    empty = _empty_class_folders(folder, classes)
    if empty:
        raise SelaggError(f"The class folder{'s' if len(empty) > 1 else ''} {', '.join(map(repr, empty))} in {folder} "
                          f"hold{'' if len(empty) > 1 else 's'} no image files ({' '.join(IMG_EXTENSIONS)}); add "
                          "images or remove the folder.")
    return ImageFolder(str(folder), transform=transform, loader=rgb_image)


def _check_same_classes(root: Path) -> None:
    """Refuse `root/val` when its class folders differ from `root/train`'s (the labels would not mean the same)."""
    train, val = root / "train", root / "val"
    if train.is_dir() and val.is_dir():
        a, b = _class_folders(train), _class_folders(val)
        if a != b:
            differ = sorted(set(a) ^ set(b))
            raise SelaggError(f"{train} and {val} hold different class folders ({', '.join(differ[:5])}"
                              f"{' ...' if len(differ) > 5 else ''} in one only), so a label would name another class "
                              "in each; give both the same class folders.")


def image_folder(root: str | os.PathLike, split: str, image_size: int | None = None, val_fraction: float = 0.1,
                 seed: int = 0, data_config: dict | None = None, max_images: int | None = None) -> Dataset:
    """A split of `root/{train,val}/<class>/*`: test is val/, our train and val are carved from train/ by class."""
    from .checks import real_number

    _check_split(split)
    root = Path(root)
    folder = root / ("val" if split == "test" else "train")
    if not folder.is_dir():
        raise SelaggError(f"No image folder at {folder}: expected {root}/train/<class>/*.jpg and "
                          f"{root}/val/<class>/*.jpg.")
    val_fraction = real_number(val_fraction, "val_fraction", 0.0, "give the share of train/ held out for val, e.g. "
                               "0.1", strictly=True, maximum=1.0)
    transform = eval_transform(data_config, image_size)
    _check_same_classes(root)
    dataset = checked_image_folder(folder, transform)
    if split != "test":
        dataset = _carved_split(dataset, split, val_fraction, seed)
    return stratified_subset(dataset, max_images, seed)


def _carved_split(dataset: Dataset, split: str, val_fraction: float, seed: int) -> torch.utils.data.Subset:
    """Our train or val split of a train folder: val is a seeded class-stratified draw, train the rest (sorted)."""
    n = len(dataset)
    n_val = max(1, math.floor(val_fraction * n))
    if n_val >= n:
        raise SelaggError(f"{dataset.root} holds {n} images, too few to carve a val split of {n_val} and keep a train "
                          "split; add images or lower val_fraction.")
    val = stratified_positions(labels_of(dataset), n_val, np.random.default_rng([seed, _CARVE_STREAM]))
    keep = np.sort(val) if split == "val" else np.setdiff1d(np.arange(n), val)
    return _subset_of_base(dataset, keep.tolist())


# ----------------------------------------------------------------------------- Imagenette
IMAGENETTE_URL = "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz"
#: The archive's md5, as torchvision's `Imagenette(size="160px")` checks it.
IMAGENETTE_MD5 = "e793b78cc4c9e9a4ccc0c1155377a412"
IMAGENETTE_FOLDER = "imagenette2-160"
_PARTIAL_PREFIX = f".{IMAGENETTE_FOLDER}.partial-"


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Where full-scale datasets live: `root` if given, else $SELAGG_DATA, else ~/.cache/selagg."""
    return Path(root or os.environ.get("SELAGG_DATA") or "~/.cache/selagg").expanduser()


def file_md5(path: Path) -> str:
    """Hex md5 of a file, read in 1 MiB pieces."""
    import hashlib

    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


@contextlib.contextmanager
def _root_locked(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on `root/.imagenette2-160.lock`, so one process at a time downloads and unpacks."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / f".{IMAGENETTE_FOLDER}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise SelaggError(f"Cannot write to the data folder {root} ({err.strerror}); set SELAGG_DATA to a writable "
                          "folder, or place Imagenette there by hand.") from None
    try:
        try:
            import fcntl
        except ImportError:  # Windows: no file locks; one process at a time is up to the reader
            fcntl = None
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _remove_partial_folders(root: Path) -> None:
    """Delete temporary folders an interrupted unpacking left (call it holding the lock: none is in use then)."""
    for partial in root.glob(f"{_PARTIAL_PREFIX}*"):
        shutil.rmtree(partial, ignore_errors=True)


def imagenette_archive(root: Path, download: bool = True) -> Path:
    """`root/imagenette2-160.tgz` with the right md5: the one there, else downloaded (a damaged one is re-fetched)."""
    from torchvision.datasets import utils as tv_utils

    from . import network
    from .checks import notice

    archive = root / Path(IMAGENETTE_URL).name
    if archive.is_file():
        if file_md5(archive) == IMAGENETTE_MD5:
            return archive
        notice(f"The archive {archive} is incomplete or damaged (its md5 differs); it is downloaded again.")
        archive.unlink()
    if not download:
        raise SelaggError(f"Imagenette is not at {root / IMAGENETTE_FOLDER} and download=False; pass download=True, "
                          f"or place the unpacked folder or {archive.name} in {root}.")
    network.require_network(IMAGENETTE_URL, "Imagenette", f"place the unpacked {IMAGENETTE_FOLDER} folder or "
                            f"{archive.name} in {root} (SELAGG_DATA chooses that folder), or use the tiny scale")
    try:  # download_url writes straight to `archive`; it re-fetches a damaged file and checks the md5 after
        tv_utils.download_url(IMAGENETTE_URL, str(root), filename=archive.name, md5=IMAGENETTE_MD5)
    except RuntimeError:  # torchvision's "File not found or corrupted.": the md5 check below says it in words
        pass
    except OSError as err:  # URLError and socket errors are OSErrors
        archive.unlink(missing_ok=True)
        raise SelaggError(f"Could not download Imagenette from {IMAGENETTE_URL} ({type(err).__name__}: {err}); check "
                          f"the connection and run again, or place {archive.name} in {root}.") from None
    if not archive.is_file() or file_md5(archive) != IMAGENETTE_MD5:
        archive.unlink(missing_ok=True)
        raise SelaggError(f"The Imagenette archive downloaded from {IMAGENETTE_URL} does not have the md5 "
                          f"{IMAGENETTE_MD5} (a broken or changed download) and was deleted; run again, or download "
                          f"it by hand into {root}.")
    return archive


def _extract_tar(archive: Path, destination: Path) -> None:
    """Extract every member of a tar archive into `destination`, refusing members that would land outside it."""
    import tarfile

    from .progress import progress_bar

    with tarfile.open(archive) as tar:
        for member in progress_bar(tar, desc=f"unpacking {archive.name}", unit=" files", leave=False):
            tar.extract(member, destination, filter="data")


def _check_imagenette_folder(folder: Path) -> None:
    """Refuse an Imagenette folder that lacks train/ or val/."""
    if folder.exists() and not folder.is_dir():
        raise SelaggError(f"{folder} is a file, where the Imagenette folder belongs; move or delete it and run again.")
    missing = [part for part in ("train", "val") if not (folder / part).is_dir()]
    if missing:
        raise SelaggError(f"The Imagenette folder {folder} lacks {' and '.join(p + '/' for p in missing)}; delete "
                          f"{folder} so that it is unpacked again, or complete it as {folder}/{{train,val}}/<class>/.")


def _unpack_imagenette(archive: Path, root: Path) -> None:
    """Extract the archive beside the target and rename the result into place only once it is complete."""
    import tarfile

    partial = Path(tempfile.mkdtemp(prefix=_PARTIAL_PREFIX, dir=root))
    try:
        try:
            _extract_tar(archive, partial)
        except (tarfile.TarError, EOFError, zlib.error) as err:
            raise SelaggError(f"Could not unpack {archive} ({type(err).__name__}: {err}); delete it so that it is "
                              "downloaded again.") from None
        except OSError as err:
            raise SelaggError(f"Could not unpack {archive} into {root} ({err.strerror or err}); free some disk space "
                              "(Imagenette-160 needs about 100 MB) and run again.") from None
        unpacked = partial / IMAGENETTE_FOLDER
        _check_imagenette_folder(unpacked)
        os.rename(unpacked, root / IMAGENETTE_FOLDER)  # atomic: the folder appears whole or not at all
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def imagenette_folder(root: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The unpacked `root/imagenette2-160` with train/ and val/, downloaded (md5 checked) and unpacked where missing."""
    root = data_root(root)
    target = root / IMAGENETTE_FOLDER
    if not target.exists() or any(root.glob(f"{_PARTIAL_PREFIX}*")):
        with _root_locked(root):
            _remove_partial_folders(root)
            if not target.exists():  # another process may have unpacked it while this one waited
                _unpack_imagenette(imagenette_archive(root, download), root)
    _check_imagenette_folder(target)
    return target


def imagenette(split: str, root: str | os.PathLike | None = None, image_size: int | None = None,
               download: bool = True, data_config: dict | None = None, max_images: int | None = None,
               seed: int = 0) -> Dataset:
    """A split of Imagenette (10 ImageNet classes, 160 px), downloaded once into `root` (default $SELAGG_DATA)."""
    _check_split(split)
    return image_folder(imagenette_folder(root, download), split, image_size, seed=seed, data_config=data_config,
                        max_images=max_images)


# ----------------------------------------------------------------------------- the registry
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
    "imagenette": DatasetSource(imagenette, "10 ImageNet classes at 160 px, downloaded once (md5 checked) into "
                                            "$SELAGG_DATA"),
    "imagefolder": DatasetSource(image_folder, "your own <path>/train/<class>/* and <path>/val/<class>/*",
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
