"""A generated stand-in for Imagenette, to rehearse the full-scale path offline (random weights, no download).

The folder has Imagenette's layout (`imagenette2-160/{train,val}/<wnid>/*.JPEG`) and its image sizes
(160 px on the short side, 160 to 240 px on the long one). Each class has its own colour and
stripe direction, so a probe on random-weight tokens still finds something to learn.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["fake_imagenette"]

#: Imagenette's ten ImageNet classes (WordNet ids), in the order torchvision's ImageFolder sorts them.
IMAGENETTE_CLASSES = ("n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
                      "n03394916", "n03417042", "n03425413", "n03445777", "n03888605")


def _image(rng: np.random.Generator, label: int, n_classes: int) -> np.ndarray:
    """One (H, W, 3) uint8 picture: a class colour, class-oriented stripes, noise; Imagenette-160 sized."""
    short, long = 160, int(rng.integers(160, 241))
    h, w = (short, long) if rng.random() < 0.7 else (long, short)  # most Imagenette images are landscape
    angle = np.pi * label / n_classes
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    stripes = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) / (4 + label % 3) + rng.uniform(0, 6.3))
    hue = np.array([np.sin(2 * np.pi * (label / n_classes + k / 3)) for k in range(3)], np.float32)
    picture = 128 + 60 * hue[None, None] + 40 * stripes[..., None] + rng.normal(0, 25, (h, w, 3))
    return np.clip(picture, 0, 255).astype(np.uint8)


def fake_imagenette(root: str | os.PathLike, train_per_class: int = 20, val_per_class: int = 6,
                    n_classes: int = 10, seed: int = 0) -> Path:
    """Write the stand-in under `root` (skipped where a finished one is there) and return `root`."""
    from PIL import Image

    root = Path(root)
    done = root / "imagenette2-160" / f".generated-{train_per_class}-{val_per_class}-{n_classes}-{seed}"
    if done.is_file():
        return root
    rng = np.random.default_rng(seed)
    for part, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label, wnid in enumerate(IMAGENETTE_CLASSES[:n_classes]):
            folder = root / "imagenette2-160" / part / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(_image(rng, label, n_classes)).save(folder / f"{wnid}_{i:05d}.JPEG", quality=85)
    done.touch()
    return root
