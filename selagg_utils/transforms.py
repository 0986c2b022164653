"""How images are read and shown: timm data configs, the eval transform, and de-normalised images for display."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .checks import SelaggError

__all__ = ["displayable"]


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
                          "timm.data.resolve_model_data_config(model) or transforms.model_data_config(model).")
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
