"""Datasets by name: the registry `load_dataset` reads, and `load_split` for a scale's sizes.

`cluttered-digits` is the offline lab (`digits`); `imagenette` and `imagefolder:<path>` are image
folders (`imagenette`). At full scale each split goes through the eval transform of the checkpoint
(`data_config`, from `transforms.model_data_config(model)`), may be capped to a seeded
class-stratified subset (`max_images`, see `subsets`), and comes back displayable with
`transforms.displayable`.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch.utils.data import Dataset

from .digits import ClutteredDigits, DigitsRecipe, cluttered_digits
from .errors import SelaggError
from .imagenette import image_folder, imagenette

__all__ = ["DatasetSource", "REGISTRY", "available_datasets", "DATASETS", "load_dataset", "load_split"]

if TYPE_CHECKING:
    from .config import ScaleSettings


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
