"""Images for display: model inputs de-normalised with their transform's own mean and std."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .checks import SelaggError

__all__ = ["displayable"]


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
