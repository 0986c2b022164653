"""What identifies a cache entry, and where it lives.

The key holds everything that determines the tokens: the weights actually used (a checkpoint's
sha256, a timm name with its pretrained tag, random weights with their seed, or the digest of a
model passed in), the dataset's content (its recipe and split and a digest of its tensors, a digest
of its files or items, or a key the caller gives), the transform, the block, the dtype and the
precision of the forward pass. The file name is a digest of the key; the format is part of the key,
so entries of an older format have other names and are never read. The folder is checked for being
a writable folder with room for the entries before any extraction.
"""
from __future__ import annotations

import enum
import functools
import hashlib
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import Dataset

from ..checks import SelaggError, sha256_of
from ..config import process_device
from ..extraction import EXTRACTION_VERSION, compute_precision
from ..models import BackboneSpec, read_manifest, resolve_backbone, token_layout
from ..weights.files import vit_config
from .files import temporary_prefix, tensors_digest, update_digest

__all__ = ["CACHE_ENV", "writable_folder", "writable_cache_dir", "token_entry_bytes", "pooled_entry_bytes",
           "token_shape", "size_text", "check_disk_space", "backbone_identity", "dataset_identity",
           "entry_key", "pooled_key", "key_digest", "key_text", "entry_path"]

CACHE_ENV = "SELAGG_CACHE"
CACHE_FORMAT = 3
#: What the header and alignment of an entry may take beyond its tensors, in the disk-space check.
HEADER_ALLOWANCE = 1 << 20


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The feature cache folder: the argument, else $SELAGG_CACHE, else ~/.cache/selagg/features."""
    return Path(path or os.environ.get(CACHE_ENV) or "~/.cache/selagg/features").expanduser()


def writable_folder(folder: Path, what: str, remedy: str) -> Path:
    """`folder`, created if needed and checked to accept a new file, else a SelaggError naming `what` (before any work)."""
    if folder.exists() and not folder.is_dir():
        raise SelaggError(f"The {what} location {folder} is a file, not a folder; {remedy}.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=temporary_prefix(folder / "write-check"), suffix=".tmp")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise SelaggError(f"The {what} folder {folder} cannot be written ({err.strerror or err}); {remedy}, "
                          "one you can write, e.g. under /tmp.") from None
    return folder


def writable_cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache folder, created if needed and checked to accept a new file, else a SelaggError (before any work)."""
    return writable_folder(cache_dir(path), "feature cache", f"point {CACHE_ENV} (or directory=) to a folder")


def token_entry_bytes(n_images: int, n_tokens: int, width: int) -> int:
    """Bytes on disk of one block's entry: float16 tokens, int64 labels and room for the header."""
    return n_images * n_tokens * width * 2 + n_images * 8 + HEADER_ALLOWANCE


def pooled_entry_bytes(n_images: int, width: int, has_cls: bool) -> int:
    """Bytes on disk of a pooled entry: float32 mean (and [cls]), int64 labels and room for the header."""
    return n_images * width * 4 * (1 + int(has_cls)) + n_images * 8 + HEADER_ALLOWANCE


def token_shape(model: VisionTransformer) -> tuple[int, int]:
    """(tokens per image, width) of a timm ViT's output: patches plus prefix tokens, and embed_dim."""
    return token_layout(model).num_tokens, int(model.embed_dim)


def size_text(n_bytes: int) -> str:
    """A byte count for a reader: '2.9 GB', '310 MB', '12 kB'."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= size:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{n_bytes} B"


def check_disk_space(folder: Path, needed: int) -> None:
    """Raise a SelaggError (before any extraction) when the cache folder's disk has less than `needed` bytes free."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise SelaggError(f"Extracting these tokens needs {size_text(needed)} in the feature cache {folder}, but "
                          f"only {size_text(free)} is free there; point {CACHE_ENV} (or directory=) to a disk with "
                          "more room, or set SELAGG_MAX_IMAGES to fewer images per split.")


# ----------------------------------------------------------------------------- what identifies an entry
def state_digest(model: torch.nn.Module) -> str:
    """Hex sha256 of a model's weights and buffers (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        update_digest(digest, name, tensor)
    return digest.hexdigest()


def weights_identity(spec: BackboneSpec) -> dict:
    """What identifies the weights a `models.BackboneSpec` loads (part of every feature cache key)."""
    code = {"timm": timm.__version__, "torch": torch.__version__.split("+")[0]}  # they compute the tokens
    if spec.kind in ("tiny", "file"):  # the manifest's architecture too: it decides how the weights are used
        manifest = read_manifest(spec.path)
        weights = {"backbone": spec.name, "sha256": manifest["sha256"]} if spec.kind == "tiny" else \
            {"backbone": spec.path.name, "sha256": sha256_of(spec.path)}
        return {**weights, "model_config": manifest.get("model_config"), **code}
    size = {"img_size": spec.img_size} if spec.img_size else {}
    if spec.path is not None:  # a timm architecture with weights from a local file
        return {"backbone": spec.arch, "weights": spec.path.name, "sha256": sha256_of(spec.path), **size, **code}
    if not spec.pretrained:
        return {"backbone": spec.name, "weights": "random", "seed": spec.seed, **code, **size}
    cfg = timm.models.get_pretrained_cfg(spec.arch)
    source = (cfg.hf_hub_id or cfg.url or "") if cfg is not None else ""
    return {"backbone": spec.name, "weights": "pretrained", "tag": getattr(cfg, "tag", None) or "default",
            "source": source, **code, **size}



def backbone_identity(name: str | os.PathLike, model: torch.nn.Module | None = None) -> dict:
    """What identifies the weights that make the tokens: a model passed in by the digest of its weights,
    otherwise what `models.resolve_backbone(name)` says `load_backbone(name)` would load."""
    if model is not None:
        name = str(name)
        label = Path(name).name if name.endswith(".safetensors") else name
        return {"backbone": label, "weights": "the model passed in", "state_sha256": state_digest(model),
                "architecture": architecture(model)}
    return weights_identity(resolve_backbone(name))


def architecture(model: torch.nn.Module) -> dict | str:
    """What the weights do not say about a model passed in: its class and a ViT's settings (heads per block, say)."""
    try:
        heads = [int(block.attn.num_heads) for block in model.blocks]
        return {"class": type(model).__qualname__, **vit_config(model), "heads": heads,
                "prefix_tokens": int(getattr(model, "num_prefix_tokens", 0))}
    except (AttributeError, TypeError, IndexError):  # not a timm ViT: its class is all that can be said
        return {"class": f"{type(model).__module__}.{type(model).__qualname__}"}


def content_identity(dataset: Dataset) -> dict:
    """What identifies a dataset's images and labels: recipe and tensor digest, file list, or item digest."""
    if isinstance(dataset, torch.utils.data.Subset):
        indices = [int(i) for i in dataset.indices]
        return {"subset_of": content_identity(dataset.dataset), "n_images": len(indices),
                "indices_sha256": hashlib.sha256(json.dumps(indices).encode()).hexdigest()}
    key = getattr(dataset, "key", None)
    if isinstance(key, dict):  # a recipe; the digest of its tensors guards against changed or hand-built data
        tensors = {n: getattr(dataset, n) for n in ("images", "labels")
                   if isinstance(getattr(dataset, n, None), torch.Tensor)}
        return {**key, **({"content_sha256": tensors_digest(tensors)} if tensors else {})}
    if isinstance(dataset, torch.utils.data.TensorDataset):
        return {"tensors_sha256": tensors_digest({str(i): t for i, t in enumerate(dataset.tensors)}),
                "n_images": len(dataset)}
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list) and hasattr(dataset, "root"):  # torchvision's ImageFolder and DatasetFolder
        return {"root": str(dataset.root), "n_images": len(samples), "files_sha256": files_digest(samples)}
    return {"type": type(dataset).__name__, "n_images": len(dataset), "items_sha256": items_digest(dataset)}


def files_digest(samples: list[tuple[str, int]]) -> str:
    """Hex sha256 of a folder dataset's files: path, label, size and modification time of each."""
    digest = hashlib.sha256()
    for path, target in samples:
        info = os.stat(path)
        digest.update(f"{path}|{target}|{info.st_size}|{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def items_digest(dataset: Dataset) -> str:
    """Hex sha256 of every item a dataset returns (one pass over its data, no model)."""
    digest = hashlib.sha256()
    for i in range(len(dataset)):
        item = dataset[i]
        for j, part in enumerate(item if isinstance(item, (tuple, list)) else (item,)):
            if isinstance(part, torch.Tensor):
                update_digest(digest, f"{i}.{j}", part)
            elif hasattr(part, "tobytes"):  # numpy arrays and PIL images: their pixels, not their address
                layout = (getattr(part, "shape", getattr(part, "size", None)), getattr(part, "dtype", None),
                          getattr(part, "mode", None))
                digest.update(f"{i}.{j}|{type(part).__name__}|{layout}|".encode())
                digest.update(part.tobytes())
            else:
                digest.update(f"{i}.{j}|{part!r}|".encode())
    return digest.hexdigest()


def transform_identity(dataset: Dataset) -> str | dict:
    """What the dataset does to its stored images (and labels) before they reach the model, described in full."""
    base = dataset
    while isinstance(base, torch.utils.data.Subset):
        base = base.dataset
    transform, target = getattr(base, "transform", None), getattr(base, "target_transform", None)
    if transform is None and target is None:
        return "none (tensors as stored)"
    described = {"transform": describe_transform(transform, "transform")}
    return {**described, "target_transform": describe_transform(target, "target_transform")} if target else described


def describe_transform(step, where: str, depth: int = 0):
    """A transform as plain data: each object's class and every public attribute, tensors by digest; a SelaggError
    for a function (a Lambda's, say), whose effect no description can capture."""
    if step is None or isinstance(step, (bool, int, float, str)):
        return step
    if isinstance(step, enum.Enum):
        return f"{type(step).__qualname__}.{step.name}"
    if isinstance(step, (torch.Tensor, np.ndarray)):
        return {"tensor_sha256": tensors_digest({"t": torch.as_tensor(step)})}
    if isinstance(step, (list, tuple)):
        return [describe_transform(s, f"{where}[{i}]", depth + 1) for i, s in enumerate(step)]
    if isinstance(step, dict):
        return {str(k): describe_transform(v, f"{where}[{k!r}]", depth + 1) for k, v in step.items()}
    if isinstance(step, type):
        return f"class {step.__module__}.{step.__qualname__}"
    state = getattr(step, "__dict__", None)
    if depth > 20 or inspect.isroutine(step) or isinstance(step, functools.partial) or state is None:
        raise SelaggError(f"The dataset's {where} is {type(step).__name__} {step!r:.60}, whose effect the cache key "
                          "cannot describe (two different ones would share an entry); use torchvision's or timm's "
                          "transform classes, or pass data_key='...' naming the images, labels and transform.")
    described = {"class": f"{type(step).__module__}.{type(step).__qualname__}"}
    for name, value in sorted(state.items()):
        if not name.startswith("_") and name != "training":
            described[name] = describe_transform(value, f"{where}.{name}", depth + 1)
    if isinstance(step, torch.nn.Module):
        described["modules"] = {n: describe_transform(m, f"{where}.{n}", depth + 1) for n, m in step._modules.items()}
        described["state_sha256"] = tensors_digest(dict(step.state_dict()))
    return described


def dataset_identity(dataset: Dataset, data_key: str | None = None) -> dict:
    """What identifies a dataset split's content and transform (a caller's `data_key` replaces both)."""
    if data_key is not None:
        if not isinstance(data_key, str) or not data_key.strip():
            raise SelaggError(f"data_key={data_key!r} is not accepted: it must be a non-empty string that names "
                              "this exact content (images, labels and transform), e.g. 'my-scans-v3-val'.")
        return {"data": {"caller_key": data_key, "n_images": len(dataset)}, "transform": "part of data_key"}
    return {"data": content_identity(dataset), "transform": transform_identity(dataset)}


def entry_key(identity: dict, block: int | str, norm: bool, compute: str = "float32") -> dict:
    """The full key of one block's entry, from the weights' and the dataset's identity, the forward precision and the
    version of the code that computes tokens (`extraction.EXTRACTION_VERSION`)."""
    return {"format": CACHE_FORMAT, "code": EXTRACTION_VERSION, **identity, "block": block, "norm": norm,
            "dtype": "float16", "compute": compute}


def pooled_key(identity: dict, block: int | str, norm: bool, compute: str = "float32") -> dict:
    """The full key of a pooled entry: the tokens' key, marked pooled ([cls] and mean of patches, float32)."""
    return {**entry_key(identity, block, norm, compute), "pooled": True, "dtype": "float32 from float16 tokens"}


def cache_key(backbone: str | os.PathLike, dataset: Dataset, block: int | str, norm: bool,
              model: torch.nn.Module | None = None, data_key: str | None = None,
              device: str | torch.device | None = None) -> dict:
    """The full key of a cache entry (device None: this process's, as `features.cached_tokens` keys it)."""
    return entry_key({**backbone_identity(backbone, model), **dataset_identity(dataset, data_key)}, block, norm,
                     compute_precision(process_device(device)))


def key_digest(key: dict) -> str:
    """A short stable name for a key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def key_text(key: dict) -> str:
    """A key as stored in an entry's metadata."""
    return json.dumps(key, sort_keys=True, default=str)


def entry_path(key: dict, directory: str | os.PathLike | None = None) -> Path:
    """Where the cache entry of a key lives."""
    return cache_dir(directory) / f"{key_digest(key)}.safetensors"


#: The fields of a cache key or store identity that describe the data, not what made the tokens from it.
_DATA_FIELDS = frozenset({"format", "code", "data", "transform", "block", "norm", "dtype", "compute", "pooled",
                          "subset", "store", "part", "parts", "split", "dataset"})



def key_source(key: dict) -> dict | None:
    """What made tokens from their images, read from their key (a cache key or a store identity): the weights'
    identity, the block and the final norm; None for a key that names no backbone (tokens built by hand)."""
    key = json.loads(json.dumps(key, sort_keys=True, default=str))
    if "backbone" not in key:  # tokens built by hand, or a key of the caller's own
        return None
    weights = key["backbone"] if isinstance(key["backbone"], dict) else \
        {k: v for k, v in key.items() if k not in _DATA_FIELDS}
    return {"weights": weights, "block": key.get("block"), "norm": key.get("norm")}
