"""How a full-scale backbone reads an image folder: timm's data config of its checkpoint (size,
interpolation, crop, mean, std), checked, and the eval transform built from it."""
from __future__ import annotations

import torch

from ..checks import SelaggError

#: The keys of the dict `timm.data.resolve_model_data_config(model)` returns (crop_mode is optional).
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")



__all__ = ["DATA_CONFIG_KEYS", "default_data_config", "model_data_config", "resolved_data_config", "eval_transform"]


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
    from ..checks import whole_number

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
