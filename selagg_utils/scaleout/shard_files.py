"""The files of a sharded token store: shard names and image ranges, the store's identity, 8-bit tokens,
atomic shard and sidecar writes, the checks of a folder before a (resumed) extraction, and reading a
shard's safetensors header and mapping its tensors. `shards` builds the store and reads it with these.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch.utils.data import Dataset, Subset

from ..cache.files import temporary_prefix
from ..cache.keys import backbone_identity, dataset_identity, key_digest, size_text, writable_folder
from ..checks import SelaggError, options_object, sha256_of, whole_number_fields
from ..extraction import EXTRACTION_VERSION, ExtractOptions, compute_precision, resolved_options
from ..models import TokenLayout

__all__ = ["STORE_FORMAT", "STORED_DTYPES", "INDEX_NAME", "DEQUANTISE_BYTES", "SHARD_META", "REDO",
           "recorded_layout", "StoreOptions", "checked_store", "shard_name", "sidecar_name", "shard_ranges",
           "store_identity", "identity_difference", "quantized", "dequantized", "VERIFIED", "file_stamp",
           "remember_verified", "atomic_write", "write_shard", "read_json", "complete_shard", "check_folder",
           "check_disk_room", "shard_bytes", "index_from_sidecars", "ShardHeader", "shard_header",
           "mapped_tensors"]

STORE_FORMAT = 1
STORED_DTYPES = ("float16", "int8")
INDEX_NAME = "index.json"
#: What a shard's header and its sidecar may take beyond its tensors, in the disk-space check.
SHARD_ALLOWANCE = 1 << 16
#: int8 tokens are dequantised this many bytes of float32 at a time (small enough to stay in the cache:
#: 3.5 times faster than 64 MiB on a 2-core CPU).
DEQUANTISE_BYTES = 4 << 20
#: The one metadata field of a shard file: JSON with the format, identity digest, shard number and image range.
SHARD_META = "selagg_shard"
_SAFETENSORS_DTYPES = {"F16": torch.float16, "I8": torch.int8, "I64": torch.int64}
REDO = "run the extraction again into this folder (complete shards are kept), or delete the folder"


def layout_record(layout: TokenLayout) -> dict:
    """The token layout as the index and the sidecars write it."""
    return {"num_prefix_tokens": layout.num_prefix_tokens, "has_cls": layout.has_cls,
            "grid_size": list(layout.grid_size)}


def recorded_layout(record: dict) -> TokenLayout:
    """The token layout an index or a sidecar records."""
    has_cls = bool(record["has_cls"])
    return TokenLayout(has_cls, int(record["num_prefix_tokens"]) - int(has_cls), tuple(record["grid_size"]))


# ----------------------------------------------------------------------------- options, names and identity
@dataclass(frozen=True)
class StoreOptions:
    """How a store keeps a split's tokens: images per shard file, 'float16' or 'int8' tokens (one float16 scale per
    token), and the split name recorded in its identity (None: the dataset's own)."""

    shard_size: int = 1024
    dtype: str = "float16"
    split: str | None = None

    def __post_init__(self) -> None:
        """Refuse a shard size, stored dtype or split name the store cannot use, before any work."""
        whole_number_fields(self, {"shard_size": (1, "pass the number of images per shard file, e.g. 1024")})
        if self.dtype not in STORED_DTYPES:
            raise SelaggError(f"dtype={self.dtype!r} is not a stored token type; choose 'float16' or 'int8' (8-bit "
                              "tokens with one float16 scale per token, half the bytes).")
        if self.split is not None and not isinstance(self.split, str):
            raise SelaggError(f"split={self.split!r} is not a split name; pass a string such as 'train', or None "
                              "for the dataset's own.")


def checked_store(store: StoreOptions | None) -> StoreOptions:
    """StoreOptions() for None; a SelaggError for anything but a StoreOptions."""
    return options_object(store, StoreOptions, "store", "StoreOptions(shard_size=1024, dtype='int8')", StoreOptions())


def shard_name(i: int) -> str:
    """The file name of shard i."""
    return f"shard-{i:05d}.safetensors"


def sidecar_name(i: int) -> str:
    """The file name of shard i's sidecar."""
    return f"shard-{i:05d}.json"


def shard_ranges(n_images: int, shard_size: int) -> list[tuple[int, int]]:
    """The image range [start, stop) of every shard: fixed by the split's size and the shard size alone."""
    return [(start, min(start + shard_size, n_images)) for start in range(0, n_images, shard_size)]


def split_of(dataset: Dataset) -> str | None:
    """The split name a dataset (or the dataset below its subsets) carries, if any."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    split = getattr(dataset, "split", None)
    return split if isinstance(split, str) else None


def store_identity(backbone: str | os.PathLike, dataset: Dataset, *, block: int | None = None,
                   store: StoreOptions | None = None, options: ExtractOptions | None = None,
                   model: torch.nn.Module | None = None) -> dict:
    """What determines a store's tokens: weights, dataset content and transform, split, block, norm, forward
    precision, stored dtype and format (block None = the last block after the final norm; norm and device from
    `options`, dtype and split from `store`)."""
    store = checked_store(store)
    options = resolved_options(options)
    return plain({"format": STORE_FORMAT, "code": EXTRACTION_VERSION, "backbone": backbone_identity(backbone, model),
                  "dataset": dataset_identity(dataset),
                  "split": store.split if store.split is not None else split_of(dataset),
                  "block": "last" if block is None else block, "norm": True if block is None else bool(options.norm),
                  "compute": compute_precision(options.device), "dtype": store.dtype})


def plain(value: dict) -> dict:
    """A dict as it reads back from JSON (tuples become lists), so that stored and asked identities compare."""
    return json.loads(json.dumps(value, default=str))


def identity_difference(found: dict, wanted: dict) -> str | None:
    """What differs between a store's identity and the one wanted, in words (None when nothing does)."""
    wanted = plain({**wanted, **({"block": "last"} if "block" in wanted and wanted["block"] is None else {})})
    parts = []
    for key in wanted:
        have, want = found.get(key), wanted[key]
        if have == want:
            continue
        if key == "backbone" and isinstance(have, dict) and isinstance(want, dict):
            a, b = have.get("backbone"), want.get("backbone")
            parts.append(f"backbone {a!r} where {b!r} was asked for" if a != b else f"other weights of backbone {a!r}")
        elif key == "dataset":
            parts.append("another dataset (its images, labels or transform differ)")
        else:
            parts.append(f"{key} {have!r} where {want!r} was asked for")
    return "; ".join(parts) or None


# ----------------------------------------------------------------------------- 8-bit tokens
def quantized(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 tokens and one float16 scale per token (symmetric: scale = max|x| / 127), from (..., D) tokens."""
    x = tokens.float()
    scale = (x.abs().amax(-1) / 127).to(torch.float16)
    s = scale.float().unsqueeze(-1)
    q = torch.where(s > 0, torch.round(x / s.clamp_min(torch.finfo(torch.float32).tiny)), torch.zeros_like(x))
    return q.clamp_(-127, 127).to(torch.int8), scale


def dequantized(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float16 tokens from int8 tokens and their per-token float16 scales (kept within float16's range, which
    127 times a scale rounded up to float16 can pass by a hair)."""
    limit = torch.finfo(torch.float16).max
    return (q.float() * scale.float().unsqueeze(-1)).clamp_(-limit, limit).to(torch.float16)


# ----------------------------------------------------------------------------- writing
#: Shard files whose sha256 this process computed: path -> (size, mtime, inode) at the time.
VERIFIED: dict[str, tuple[int, int, int]] = {}


def file_stamp(path: Path) -> tuple[int, int, int]:
    """(size, mtime, inode) of a file: any replacement or change of it changes the stamp."""
    info = path.stat()
    return info.st_size, info.st_mtime_ns, info.st_ino


def remember_verified(path: Path) -> None:
    """Note that this process has just checked (or written) a shard file whose sha256 is the one recorded."""
    VERIFIED[str(path.resolve())] = file_stamp(path)


def atomic_write(path: Path, write: Callable[[str], None]) -> str:
    """Write a file through a temporary one beside it, renamed into place; returns the sha256 of what was written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        digest = sha256_of(tmp)
        os.replace(tmp, path)
        return digest
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def shard_tensors(tokens: torch.Tensor, labels: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    """What a shard file holds: labels int64 and float16 tokens, or int8 tokens and their float16 scales."""
    if dtype == "int8":
        q, scales = quantized(tokens)
        return {"labels": labels.to(torch.int64), "tokens": q, "scales": scales}
    return {"labels": labels.to(torch.int64), "tokens": tokens.to(torch.float16).contiguous()}


def write_shard(folder: Path, i: int, span: tuple[int, int], tokens: torch.Tensor, labels: torch.Tensor,
                identity: dict, layout: TokenLayout) -> dict:
    """Write shard i and then its sidecar, each atomically; returns the sidecar."""
    digest = key_digest(identity)
    # one metadata field: safetensors writes several in a random order, and the file would differ run to run
    meta = {SHARD_META: json.dumps({"format": STORE_FORMAT, "identity_digest": digest, "shard": i,
                                    "start": span[0], "stop": span[1]}, sort_keys=True)}
    tensors = shard_tensors(tokens, labels, identity["dtype"])
    path = folder / shard_name(i)
    try:
        sha = atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        remember_verified(path)
        sidecar = {"shard": i, "file": path.name, "start": span[0], "stop": span[1], "sha256": sha,
                   "bytes": path.stat().st_size, "identity_digest": digest, "identity": identity,
                   "n_tokens": int(tokens.shape[1]), "width": int(tokens.shape[2]),
                   "layout": layout_record(layout)}
        text = json.dumps(sidecar, indent=1) + "\n"
        atomic_write(folder / sidecar_name(i), lambda tmp: Path(tmp).write_text(text))
    except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error
        kept = len(list(folder.glob("shard-*.json")))
        raise SelaggError(f"Could not write {path.name} into {folder} ({getattr(err, 'strerror', None) or err}): the "
                          f"disk is full or refuses the file; the {kept} complete shard(s) already there are kept, so "
                          "free some room (or store int8 tokens) and run the same command again to extract only "
                          "the rest.") from None
    return sidecar


def read_json(path: Path) -> dict | None:
    """A JSON object from a file, or None when it is missing or not a JSON object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def complete_shard(folder: Path, i: int, span: tuple[int, int], digest: str) -> bool:
    """Whether shard i is on disk with a sidecar of this store and this range whose sha256 its file matches."""
    sidecar = read_json(folder / sidecar_name(i))
    path = folder / shard_name(i)
    if sidecar is None or not path.is_file() or sidecar.get("identity_digest") != digest:
        return False
    if (sidecar.get("start"), sidecar.get("stop")) != span or sidecar.get("bytes") != path.stat().st_size:
        return False
    if sha256_of(path) != sidecar.get("sha256"):
        return False
    remember_verified(path)
    return True


def check_folder(folder: Path, identity: dict, ranges: list[tuple[int, int]], shard_size: int) -> None:
    """Refuse, before any work, a folder that is a file or holds a store (or shards) of another request."""
    writable_folder(folder, "token store", "pass a folder for the store")
    records = [(folder / INDEX_NAME, read_json(folder / INDEX_NAME))]
    records += [(p, read_json(p)) for p in sorted(folder.glob("shard-*.json"))]
    for path, record in records:
        if record is None or not isinstance(record.get("identity"), dict):
            continue
        difference = identity_difference(record["identity"], identity)
        if difference:
            raise SelaggError(f"The folder {folder} already holds tokens of another request ({path.name} says: "
                              f"{difference}); extract into an empty folder, or delete this one first.")
        if path.name == INDEX_NAME and record.get("shard_size") != shard_size:
            raise SelaggError(f"The store in {folder} has shards of {record.get('shard_size')} images, not "
                              f"{shard_size}; pass shard_size={record.get('shard_size')} to resume it, or extract "
                              "into an empty folder.")
        if path.name != INDEX_NAME:
            i = record.get("shard")
            if not (isinstance(i, int) and 0 <= i < len(ranges)
                    and (record.get("start"), record.get("stop")) == ranges[i]):
                raise SelaggError(f"The shard {path.name} in {folder} covers images {record.get('start')} to "
                                  f"{record.get('stop')}, which shards of {shard_size} images do not; resume with "
                                  "the shard size it was written with, or extract into an empty folder.")


def check_disk_room(folder: Path, needed: int) -> None:
    """Raise a SelaggError (before any extraction) when the store's disk has less than `needed` bytes free."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise SelaggError(f"The missing shards need {size_text(needed)} in {folder}, but only {size_text(free)} is "
                          "free there; write the store to a disk with more room, or store it with dtype='int8'.")


def shard_bytes(n_images: int, n_tokens: int, width: int, dtype: str) -> int:
    """Bytes on disk of a shard of n_images: tokens (and int8 scales), labels, and room for the header and sidecar."""
    per_token = width * (1 if dtype == "int8" else 2) + (2 if dtype == "int8" else 0)
    return n_images * (n_tokens * per_token + 8) + SHARD_ALLOWANCE


def index_from_sidecars(folder: Path, identity: dict, ranges: list[tuple[int, int]], shard_size: int) -> dict:
    """The store's index, built from the sidecars of all its shards (a SelaggError names a shard missing)."""
    sidecars = []
    for i, span in enumerate(ranges):
        sidecar = read_json(folder / sidecar_name(i))
        if sidecar is None or sidecar.get("identity_digest") != key_digest(identity) \
                or (sidecar.get("start"), sidecar.get("stop")) != span:
            raise SelaggError(f"Shard {i} (images {span[0]} to {span[1]}) of the store in {folder} was not written "
                              f"by this extraction; {REDO}.")
        sidecars.append(sidecar)
    first = sidecars[0]
    return {"format": STORE_FORMAT, "identity": identity, "identity_digest": key_digest(identity),
            "layout": first["layout"], "n_images": ranges[-1][1], "n_tokens": first["n_tokens"],
            "width": first["width"], "shard_size": shard_size, "dtype": identity["dtype"],
            "shards": [{k: s[k] for k in ("file", "start", "stop", "sha256", "bytes")} for s in sidecars]}


# ----------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class ShardHeader:
    """A shard file's metadata and, per tensor, (dtype, shape, start, end) of its bytes in the file."""

    meta: dict[str, str]
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]


def shard_header(path: Path) -> ShardHeader:
    """The header of a safetensors shard, or a SelaggError when it is not one."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            file_size = os.fstat(f.fileno()).st_size
            if size > min(file_size - 8, 100 << 20):
                raise ValueError("header length beyond the file")
            header = json.loads(f.read(size).decode("utf-8"))
        meta = header.pop("__metadata__", {}) or {}
        tensors = {name: (_SAFETENSORS_DTYPES[t["dtype"]], tuple(t["shape"]), 8 + size + t["data_offsets"][0],
                          8 + size + t["data_offsets"][1]) for name, t in header.items()}
        for dtype, shape, start, end in tensors.values():
            if end - start != dtype.itemsize * math.prod(shape) or start % dtype.itemsize or end > file_size:
                raise ValueError("tensor bytes beyond the file or of the wrong size")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SelaggError(f"The shard {path} is not a readable safetensors file ({type(err).__name__}); {REDO}.") \
            from None
    return ShardHeader(meta, tensors)


def mapped_tensors(path: Path, header: ShardHeader) -> dict[str, torch.Tensor]:
    """A shard's tensors as copy-on-write views of its file (nothing is read until they are used)."""
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    out = {}
    for name, (dtype, shape, start, end) in header.tensors.items():
        count = (end - start) // dtype.itemsize
        out[name] = (torch.frombuffer(mapping, dtype=dtype, count=count, offset=start).view(shape) if count
                     else torch.empty(shape, dtype=dtype))
    return out
