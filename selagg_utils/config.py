"""The two scales of the book: `tiny` (offline, CPU, the default) and `full` (timm weights, GPU)."""
from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .backbone_names import check_full_scale_name
from .checks import env_flag, notice
from .devices import half_dtype, resolve_device
from .errors import SelaggError

SCALES = ("tiny", "full")
ENV_VAR = "SELAGG_SCALE"
#: At full scale, the most images a chapter reads per split (a seeded, class-stratified subset); unset = all.
MAX_IMAGES_VAR = "SELAGG_MAX_IMAGES"
#: At full scale, the further backbones of the paper's families (comma-separated names); unset = MORE_BACKBONES.
MORE_VAR = "SELAGG_MORE_BACKBONES"
#: DINOv2 with four registers (a joint-embedding model with register tokens) and I-JEPA (no [cls] token).
MORE_BACKBONES = ("vit_base_patch14_reg4_dinov2.lvd142m", "vit_huge_patch14_gap_224.in1k_ijepa")

__all__ = ["SCALES", "ENV_VAR", "MAX_IMAGES_VAR", "MORE_VAR", "MORE_BACKBONES", "scale", "ScaleSettings", "max_images",
           "more_backbones", "DATASET_CLASSES", "settings", "device", "half_dtype", "seed_everything", "describe"]


def scale(value: str | None = None) -> str:
    """The scale in force: the argument if given, else $SELAGG_SCALE, else 'tiny'."""
    chosen = (value or os.environ.get(ENV_VAR) or "tiny").strip().lower()
    if chosen not in SCALES:
        raise SelaggError(f"Unknown scale {chosen!r}; choose 'tiny' (offline, CPU) or 'full' (timm weights, GPU).")
    return chosen


@dataclass(frozen=True)
class ScaleSettings:
    """What a chapter uses at one scale (n_train/n_eval: images per split; None = the whole split)."""

    scale: str
    mim: str
    jea: str
    control: str
    dataset: str
    batch_size: int
    n_train: int | None
    n_eval: int | None
    more: tuple[str, ...] = ()

    @property
    def backbones(self) -> tuple[str, str, str]:
        """The MIM model, the joint-embedding model and the untrained control, in the book's order."""
        return (self.mim, self.jea, self.control)


def max_images() -> int | None:
    """The per-split image cap of the full scale from $SELAGG_MAX_IMAGES (None when unset)."""
    raw = os.environ.get(MAX_IMAGES_VAR, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise SelaggError(f"{MAX_IMAGES_VAR}={raw!r} is not accepted: give a positive whole number of images per "
                          "split (e.g. 2000), or unset it to use whole splits.")
    return int(raw)


def more_backbones() -> tuple[str, ...]:
    """The further backbones of the full scale: $SELAGG_MORE_BACKBONES (comma-separated; empty = none), else the default."""
    raw = os.environ.get(MORE_VAR)
    if raw is None:
        return MORE_BACKBONES
    return tuple(name.strip() for name in raw.split(",") if name.strip())


#: Classes of each scale's dataset: an image cap below it leaves classes out of some splits.
DATASET_CLASSES = {"cluttered-digits": 10, "imagenette": 10}


def settings(value: str | None = None) -> ScaleSettings:
    """The backbones, dataset and sizes of a scale, checked whole (image cap, every backbone name, flags) before any
    work."""
    cap = max_images()
    if scale(value) == "tiny":
        if cap is not None:
            notice(f"{MAX_IMAGES_VAR}={cap} applies to the full scale only; the tiny scale draws its own 5000 "
                   "training and 2000 evaluation images (unset it, or set SELAGG_SCALE=full).")
        return ScaleSettings("tiny", "tiny-mae", "tiny-jea", "tiny-random", "cluttered-digits", 256, 5000, 2000)
    if cap is not None and cap < DATASET_CLASSES["imagenette"]:
        raise SelaggError(f"{MAX_IMAGES_VAR}={cap} is fewer images per split than imagenette's "
                          f"{DATASET_CLASSES['imagenette']} classes, so the splits would not share their classes and "
                          f"every accuracy would mean nothing; give at least {DATASET_CLASSES['imagenette']} (e.g. "
                          "500), or unset it.")
    more = more_backbones()
    for name in more:
        check_full_scale_name(name, MORE_VAR)
    env_flag("SELAGG_PRETRAINED", True)  # a misspelt flag is refused now, not when the first backbone loads
    return ScaleSettings("full", "vit_base_patch16_224.mae", "vit_base_patch16_224.dino", "random:vit_base_patch16_224",
                         "imagenette", 128, cap, cap, more=more)


def device(prefer: str | None = None, scale_name: str | None = None) -> torch.device:
    """CUDA if present, else CPU (or the device asked for, checked to exist); a warning when the full scale runs on a CPU."""
    chosen = resolve_device(prefer or None)
    if chosen.type == "cpu" and scale(scale_name) == "full":
        warnings.warn("The full scale is running on a CPU: ViT-B/16 over Imagenette takes hours there. In Colab "
                      "choose Runtime > Change runtime type > GPU, or set SELAGG_MAX_IMAGES to a few hundred.",
                      stacklevel=2)
    return chosen


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def describe(scale_name: str, dev: torch.device) -> str:
    """One line that says which scale, device and library versions a chapter runs with."""
    import timm

    return f"scale={scale_name} device={dev} torch={torch.__version__} timm={timm.__version__}"
