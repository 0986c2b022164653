"""Image folders and Imagenette: `root/{train,val}/<class>/*` read with checks, and Imagenette fetched once.

Imagenette's archive is checked against its md5 (a damaged one is fetched again) and unpacked beside
its target, then renamed into place, so a partial folder is never read; one process at a time
downloads and unpacks, under a lock file in the data folder.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from ..checks import SelaggError, notice
from ..subsets import _CAP_STREAM, CARVE_STREAM, check_split, labels_of, stratified_positions
from .transforms import eval_transform

__all__ = ["image_folder", "imagenette"]


def rgb_image(path: str):
    """The image file at `path` as an RGB PIL image, decoded from its real bit depth (16-bit grey scaled, not
    clipped), or a SelaggError naming the file when it cannot be read or its range cannot be told."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
            if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):  # 16 bits per pixel
                wide = np.asarray(image, dtype=np.uint32)
                return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
            if image.mode in ("I", "F"):
                raise ValueError(f"its pixels are {image.mode} (32-bit) values whose range cannot be told; save it "
                                 "with 8 or 16 bits per channel")
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise SelaggError(f"Could not read {path} as an image ({type(err).__name__}: {err}); remove or replace that "
                          "file and run again.") from None


_HIDDEN_SAID: set[str] = set()


def _visible(folder: str | Path) -> list:
    """The entries of a folder whose names do not start with a dot; hidden ones (Jupyter's .ipynb_checkpoints, say)
    are left out, said once per folder."""
    entries = list(os.scandir(folder))
    hidden = sorted(e.name for e in entries if e.name.startswith("."))
    if hidden and str(folder) not in _HIDDEN_SAID:
        _HIDDEN_SAID.add(str(folder))
        notice(f"Left out {len(hidden)} hidden file(s) or folder(s) in {folder} ({', '.join(hidden[:3])}); hidden "
               "entries are never classes or images.")
    return [e for e in entries if not e.name.startswith(".")]


def _class_folders(folder: Path) -> list[str]:
    """The class folders of `folder`: every visible sub-folder, sorted."""
    return sorted(e.name for e in _visible(folder) if e.is_dir())


def _image_files(class_folder: Path) -> list[str]:
    """The image files under a class folder, in os.walk's sorted order: hidden entries left out, links followed
    once, and a link loop or a link to nothing refused."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    found, seen, todo = [], set(), [class_folder]
    while todo:
        folder = todo.pop()
        real = os.path.realpath(folder)
        if real in seen:
            raise SelaggError(f"{folder} is a link back to a folder already read ({real}), so its images would count "
                              "twice (or the scan never end); remove that link.")
        seen.add(real)
        for entry in _visible(folder):
            if entry.is_dir():
                todo.append(Path(entry.path))
            elif entry.name.lower().endswith(IMG_EXTENSIONS):
                if not os.path.exists(entry.path):
                    raise SelaggError(f"{entry.path} is a link to nothing ({os.readlink(entry.path)}); remove it or "
                                      "restore its target.")
                found.append(entry.path)
    return sorted(found, key=lambda p: (os.path.dirname(p), os.path.basename(p)))


def _empty_class_folders(folder: Path, classes: list[str]) -> list[str]:
    """The class folders that hold no file ImageFolder accepts as an image."""
    return [c for c in classes if not _image_files(folder / c)]


def _checked_samples(directory: str, class_to_idx: dict[str, int], *_, **__) -> list[tuple[str, int]]:
    """(path, label) of every image of an image folder; one file reached twice (through links) is refused."""
    samples = [(path, label) for cls, label in sorted(class_to_idx.items(), key=lambda c: c[1])
               for path in _image_files(Path(directory) / cls)]
    _refuse_twice([path for path, _ in samples])
    return samples


def _refuse_twice(paths: list[str]) -> None:
    """Refuse image paths of which two are one file (a link to another image): it would count twice, or sit in two
    classes or two splits."""
    first: dict[str, str] = {}
    for path in paths:
        other = first.setdefault(os.path.realpath(path), path)
        if other != path:
            raise SelaggError(f"{path} and {other} are one file (through a link), so that image would count twice or "
                              "sit in two classes or splits; remove one of them.")


def checked_image_folder(folder: Path, transform=None):
    """An ImageFolder over `folder` whose loader names unreadable files; refused when it cannot feed a probe."""
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
    return CheckedImageFolder(str(folder), transform=transform, loader=rgb_image)


class CheckedImageFolder(ImageFolder):
    """torchvision's ImageFolder without hidden entries, with links followed once, and one file never read twice."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = _class_folders(Path(directory))
        return classes, {c: i for i, c in enumerate(classes)}

    make_dataset = staticmethod(_checked_samples)


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
    from ..checks import real_number

    check_split(split)
    root = Path(root)
    folder = root / ("val" if split == "test" else "train")
    if not folder.is_dir():
        raise SelaggError(f"No image folder at {folder}: expected {root}/train/<class>/*.jpg and "
                          f"{root}/val/<class>/*.jpg.")
    val_fraction = real_number(val_fraction, "val_fraction", 0.0, "give the share of train/ held out for val, e.g. "
                               "0.1", strictly=True, maximum=1.0)
    transform = eval_transform(data_config, image_size)
    _check_same_classes(root)
    _refuse_twice([path for part in ("train", "val") if (root / part).is_dir()  # one image in two splits
                   for cls in _class_folders(root / part) for path in _image_files(root / part / cls)])
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
    labels = labels_of(dataset)
    val = stratified_positions(labels, n_val, np.random.default_rng([seed, CARVE_STREAM]))
    keep = np.sort(val) if split == "val" else np.setdiff1d(np.arange(n), val)
    missing = sorted(set(labels.tolist()) - set(np.delete(labels, val).tolist()))
    if missing:  # a class whose every image went to val: the probe would never see it trained
        raise SelaggError(f"The class {dataset.classes[missing[0]]!r} of {dataset.root} has too few images to be in "
                          "both the train and the val split carved from it; add images to it (two at least), or "
                          "lower val_fraction.")
    return subset_of_base(dataset, keep.tolist())


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

    from ..checks import notice
    from ..weights import network

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

    from ..config import progress_bar

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
    check_split(split)
    return image_folder(imagenette_folder(root, download), split, image_size, seed=seed, data_config=data_config,
                        max_images=max_images)


def subset_of_base(dataset: Dataset, positions: list[int]) -> torch.utils.data.Subset:
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
    from ..checks import whole_number

    cap = whole_number(max_images, "max_images", 1, "give a positive number of images per split, or None for the "
                       "whole split")
    if cap >= len(dataset):
        return dataset
    labels = labels_of(dataset)
    n_classes = len(np.unique(labels))
    if cap < n_classes:
        raise SelaggError(f"max_images={cap} is fewer than the {n_classes} classes of this split, so some classes "
                          "would have no image here and the splits would not share their classes; give at least "
                          f"{n_classes} images per split, or None for the whole split.")
    positions = stratified_positions(labels, cap, np.random.default_rng([seed, _CAP_STREAM]))
    return subset_of_base(dataset, positions.tolist())
