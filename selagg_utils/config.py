"""The two scales of the book: `tiny` (offline, CPU, the default) and `full` (timm weights, GPU)."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from .errors import SelaggError

SCALES = ("tiny", "full")
ENV_VAR = "SELAGG_SCALE"


def scale(value: str | None = None) -> str:
    """The scale in force: the argument if given, else $SELAGG_SCALE, else 'tiny'."""
    chosen = (value or os.environ.get(ENV_VAR) or "tiny").strip().lower()
    if chosen not in SCALES:
        raise SelaggError(f"Unknown scale {chosen!r}; choose 'tiny' (offline, CPU) or 'full' (timm weights, GPU).")
    return chosen


@dataclass(frozen=True)
class ScaleSettings:
    """What a chapter uses at one scale."""

    scale: str
    mim: str
    jea: str
    control: str
    dataset: str
    batch_size: int
    n_train: int | None
    n_eval: int | None


def settings(value: str | None = None) -> ScaleSettings:
    """The backbones, dataset and sizes of a scale."""
    if scale(value) == "tiny":
        return ScaleSettings("tiny", "tiny-mae", "tiny-jea", "tiny-random", "cluttered-digits", 256, 5000, 2000)
    return ScaleSettings("full", "vit_base_patch16_224.mae", "vit_base_patch16_224.dino", "random:vit_base_patch16_224",
                         "imagenette", 128, None, None)


def device(prefer: str | None = None) -> torch.device:
    """CUDA if present (or the device asked for), else CPU."""
    if prefer:
        try:
            return torch.device(prefer)
        except RuntimeError:
            raise SelaggError(f"Unknown device {prefer!r}; use 'cpu', 'cuda', 'cuda:0' or 'mps'.") from None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def describe(scale_name: str, dev: torch.device) -> str:
    """One line that says which scale, device and library versions a chapter runs with."""
    import timm

    return f"scale={scale_name} device={dev} torch={torch.__version__} timm={timm.__version__}"
