"""A sharded token store: the frozen tokens of a split too large for one file, extracted by several processes.

A store is a folder: `index.json` and `shard-00000.safetensors`, `shard-00001.safetensors`, ... Shard i
holds the images [i * shard_size, (i + 1) * shard_size) of the split (the last one shorter), so the
shards do not depend on how many processes wrote them. Under `torchrun`, rank r of W extracts the
shards r, r + W, r + 2W, ... that are not complete yet (disjoint, no padding), each with the package's
own extraction (`features.extract_blocks`, eval mode, in order) and written through a temporary file
that is renamed into place, then a sidecar `shard-00000.json` (its image range, the sha256 of its file,
the store's identity). After a barrier, rank 0 writes `index.json` from the sidecars: the identity
(weights, dataset content and transform, split, block, norm, forward precision, stored dtype, format),
the token layout, the sizes and every shard's range and checksum.

A rerun into the same folder skips the shards whose sidecar and checksum verify and extracts the rest,
with any number of processes; a folder holding the store of another request is refused before any
work. Tokens are stored float16, or int8 with one float16 scale per token (symmetric: scale =
max|x| / 127), dequantised to float16 on read. `TokenStore` reads the index, checks that it describes
its shards, and maps each shard's file (copy-on-write; verified against its checksum the first time a
process maps it), so a single process can read a store that many wrote.
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
from safetensors.torch import save_file
from torch.utils.data import Dataset, Subset

from .checkpoints import remove_orphaned_temporaries, sha256_of, temporary_prefix
from .checks import whole_number
from .distributed import ProcessInfo, barrier, current_process, gathered_objects
from .errors import SelaggError
from .features import (TokenSet, backbone_identity, check_extraction_inputs, compute_precision, dataset_identity,
                       extract_blocks, key_digest, size_text, token_shape)
from .progress import progress_bar

__all__ = ["STORE_FORMAT", "STORED_DTYPES", "INDEX_NAME", "TokenLayout", "TokenStore", "extract_to_store",
           "store_identity", "identity_difference", "shard_ranges", "shard_name", "sidecar_name", "quantized",
           "dequantized"]

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
_REDO = "run the extraction again into this folder (complete shards are kept), or delete the folder"


@dataclass(frozen=True)
class TokenLayout:
    """Where the patch tokens are among an image's tokens: prefix count, whether one is [cls], the patch grid."""

    num_prefix_tokens: int
    has_cls: bool
    grid_size: tuple[int, int]


# ----------------------------------------------------------------------------- names and identity
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


def store_identity(backbone: str | os.PathLike, dataset: Dataset, *, block: int | None = None, norm: bool = True,
                   dtype: str = "float16", device: str | torch.device = "cpu", split: str | None = None,
                   model: torch.nn.Module | None = None) -> dict:
    """What determines a store's tokens: weights, dataset content and transform, split, block, norm, forward
    precision, stored dtype and format (block None = the last block after the final norm)."""
    return plain({"format": STORE_FORMAT, "backbone": backbone_identity(backbone, model),
                  "dataset": dataset_identity(dataset), "split": split if split is not None else split_of(dataset),
                  "block": "last" if block is None else block, "norm": True if block is None else bool(norm),
                  "compute": compute_precision(device), "dtype": dtype})


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
_VERIFIED: dict[str, tuple[int, int, int]] = {}


def file_stamp(path: Path) -> tuple[int, int, int]:
    """(size, mtime, inode) of a file: any replacement or change of it changes the stamp."""
    info = path.stat()
    return info.st_size, info.st_mtime_ns, info.st_ino


def remember_verified(path: Path) -> None:
    """Note that this process has just checked (or written) a shard file whose sha256 is the one recorded."""
    _VERIFIED[str(path.resolve())] = file_stamp(path)


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
    sha = atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    remember_verified(path)
    sidecar = {"shard": i, "file": path.name, "start": span[0], "stop": span[1], "sha256": sha,
               "bytes": path.stat().st_size, "identity_digest": digest, "identity": identity,
               "n_tokens": int(tokens.shape[1]), "width": int(tokens.shape[2]),
               "layout": {"num_prefix_tokens": layout.num_prefix_tokens, "has_cls": layout.has_cls,
                          "grid_size": list(layout.grid_size)}}
    text = json.dumps(sidecar, indent=1) + "\n"
    atomic_write(folder / sidecar_name(i), lambda tmp: Path(tmp).write_text(text))
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
    if folder.exists() and not folder.is_dir():
        raise SelaggError(f"The token store location {folder} is a file, not a folder; pass a folder for the store.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=temporary_prefix(folder / "write-check"), suffix=".tmp")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise SelaggError(f"The token store folder {folder} cannot be written ({err.strerror or err}); pass a folder "
                          "you can write, e.g. one under /tmp.") from None
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
                              f"by this extraction; {_REDO}.")
        sidecars.append(sidecar)
    first = sidecars[0]
    return {"format": STORE_FORMAT, "identity": identity, "identity_digest": key_digest(identity),
            "layout": first["layout"], "n_images": ranges[-1][1], "n_tokens": first["n_tokens"],
            "width": first["width"], "shard_size": shard_size, "dtype": identity["dtype"],
            "shards": [{k: s[k] for k in ("file", "start", "stop", "sha256", "bytes")} for s in sidecars]}


def extract_to_store(backbone: str | os.PathLike, dataset: Dataset, out: str | os.PathLike, *,
                     block: int | None = None, shard_size: int = 1024, dtype: str = "float16",
                     batch_size: int = 256, device: str | torch.device | None = None,
                     info: ProcessInfo | None = None, norm: bool = True, split: str | None = None,
                     model: torch.nn.Module | None = None, progress: bool = True,
                     on_shard: Callable[[int], None] | None = None) -> TokenStore:
    """Extract a split's tokens into a sharded store, this process taking its share of the missing shards.

    Every process of the group calls it with the same arguments; each returns the finished store.
    `model` replaces the weights `backbone` names; `on_shard(i)` is called after shard i is written.
    """
    from .models import has_cls_token, load_backbone, num_prefix_tokens, patch_grid

    info = info if info is not None else current_process()
    device = torch.device(device) if device is not None else info.device
    shard_size = whole_number(shard_size, "shard_size", 1, "pass the number of images per shard file, e.g. 1024")
    if dtype not in STORED_DTYPES:
        raise SelaggError(f"dtype={dtype!r} is not a stored token type; choose 'float16' or 'int8' (8-bit tokens "
                          "with one float16 scale per token, half the bytes).")
    check_extraction_inputs(dataset, batch_size)
    folder = Path(out)
    identity = store_identity(backbone, dataset, block=block, norm=norm, dtype=dtype, device=device, split=split,
                              model=model)
    ranges = shard_ranges(len(dataset), shard_size)
    check_folder(folder, identity, ranges, shard_size)
    remove_orphaned_temporaries(folder)
    digest = key_digest(identity)
    mine = range(info.rank, len(ranges), info.world_size)
    unfinished = [i for i in mine if not complete_shard(folder, i, ranges[i], digest)]
    missing = sorted(i for part in gathered_objects(unfinished) for i in part)
    todo = missing[info.rank::info.world_size]  # the missing shards, shared out again: balanced on a resume
    if todo:
        net = model if model is not None else load_backbone(backbone, device=device)
        n_tokens, width = token_shape(net)  # room for every missing shard: the ranks share one folder
        check_disk_room(folder, sum(shard_bytes(ranges[i][1] - ranges[i][0], n_tokens, width, dtype) for i in missing))
        layout = TokenLayout(num_prefix_tokens(net), has_cls_token(net), tuple(patch_grid(net)))
        for i in progress_bar(todo, enabled=progress and info.is_main, desc="extracting shards"):
            subset = Subset(dataset, range(*ranges[i]))
            tokens, labels = extract_blocks(net, subset, [block], batch_size, device, norm, progress=False)
            write_shard(folder, i, ranges[i], tokens[0], labels, identity, layout)
            if on_shard is not None:
                on_shard(i)
    barrier()
    if info.is_main:
        index = index_from_sidecars(folder, identity, ranges, shard_size)
        text = json.dumps(index, indent=1) + "\n"
        atomic_write(folder / INDEX_NAME, lambda tmp: Path(tmp).write_text(text))
    barrier()
    store = TokenStore(folder, expect=identity)
    store.extracted = tuple(missing)
    return store


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
        raise SelaggError(f"The shard {path} is not a readable safetensors file ({type(err).__name__}); {_REDO}.") \
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


class TokenStore:
    """A sharded token store on disk: its index checked against its shards, each shard mapped when read.

    `expect` (a `store_identity`, or some of its fields such as {"block": 6}) refuses a store of another
    request; with `verify`, a shard's sha256 is checked the first time this process maps it.
    """

    def __init__(self, path: str | os.PathLike, expect: dict | None = None, verify: bool = True):
        self.path, self.verify_on_read = Path(path), verify
        self.extracted: tuple[int, ...] = ()
        index = read_json(self.path / INDEX_NAME)
        if index is None:
            raise SelaggError(f"{self.path} holds no readable {INDEX_NAME}, so it is not a finished token store; "
                              "write one with extract_to_store (or scripts/extract_tokens.py) into that folder.")
        self.index = index
        self.check_index()
        self.identity: dict = index["identity"]
        if expect is not None:
            difference = identity_difference(self.identity, expect)
            if difference:
                raise SelaggError(f"The token store {self.path} holds other tokens than the ones asked for "
                                  f"({difference}); read the store extracted for that request, or extract one.")
        lay = index["layout"]
        self.layout = TokenLayout(int(lay["num_prefix_tokens"]), bool(lay["has_cls"]), tuple(lay["grid_size"]))
        self.width: int = int(index["width"])
        self.n_tokens: int = int(index["n_tokens"])
        self.dtype: str = index["dtype"]
        self.shards: list[dict] = index["shards"]
        self.headers = [self.checked_shard(i) for i in range(len(self.shards))]

    def mismatch(self, what: str) -> SelaggError:
        """The error for an index that does not describe its shards."""
        return SelaggError(f"The index of the token store {self.path} does not match its shards ({what}); {_REDO}.")

    def check_index(self) -> None:
        """Refuse an index of another format, or whose shards do not tile the split in order at its shard size."""
        index = self.index
        if index.get("format") != STORE_FORMAT or not isinstance(index.get("identity"), dict):
            raise SelaggError(f"The token store {self.path} has format {index.get('format')!r}, not {STORE_FORMAT}; "
                              "extract it again with this version of the package.")
        try:
            n, size, shards = int(index["n_images"]), int(index["shard_size"]), index["shards"]
            spans = [(int(s["start"]), int(s["stop"])) for s in shards]
            _ = (index["layout"], index["width"], index["n_tokens"], index["dtype"])
        except (KeyError, TypeError, ValueError):
            raise self.mismatch("fields are missing") from None
        if len(spans) != math.ceil(n / max(size, 1)):
            raise self.mismatch(f"it lists {len(spans)} shards where {n} images in shards of {size} need "
                                f"{math.ceil(n / max(size, 1))}")
        planned = shard_ranges(n, size)
        if spans != planned:
            bad = next(i for i, (got, want) in enumerate(zip(spans, planned)) if got != want)
            raise self.mismatch(f"shard {bad} is listed with images {spans[bad][0]} to {spans[bad][1]}, not "
                                f"{planned[bad][0]} to {planned[bad][1]}")
        if index["dtype"] not in STORED_DTYPES or index["dtype"] != index["identity"].get("dtype"):
            raise self.mismatch(f"it stores {index['dtype']!r} tokens, its identity says "
                                f"{index['identity'].get('dtype')!r}")
        if index.get("identity_digest") != key_digest(index["identity"]):
            raise self.mismatch("its identity digest is not the digest of its identity")

    def checked_shard(self, i: int) -> ShardHeader:
        """Shard i's header, checked against the index: file present, size, range, identity, tensor shapes."""
        entry, path = self.shards[i], self.path / self.shards[i]["file"]
        span = (entry["start"], entry["stop"])
        if entry["file"] != shard_name(i):
            raise self.mismatch(f"shard {i} is listed as {entry['file']}, not {shard_name(i)}")
        if not path.is_file():
            raise SelaggError(f"The token store {self.path} lacks {path.name} (images {span[0]} to {span[1]}), which "
                              f"its index lists; {_REDO}.")
        if path.stat().st_size != entry["bytes"]:
            raise self.mismatch(f"{path.name} has {path.stat().st_size} bytes, the index says {entry['bytes']}")
        header = shard_header(path)
        try:
            meta = json.loads(header.meta.get(SHARD_META, "{}"))
        except json.JSONDecodeError:
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        if meta.get("identity_digest") != self.index["identity_digest"]:
            raise self.mismatch(f"{path.name} was written for another request")
        if (meta.get("start"), meta.get("stop")) != span:
            raise self.mismatch(f"{path.name} holds images {meta.get('start')} to {meta.get('stop')}, the index "
                                f"lists {span[0]} to {span[1]}")
        n = span[1] - span[0]
        want = {"labels": (torch.int64, (n,)),
                "tokens": (torch.int8 if self.index["dtype"] == "int8" else torch.float16,
                           (n, int(self.index["n_tokens"]), int(self.index["width"])))}
        if self.index["dtype"] == "int8":
            want["scales"] = (torch.float16, (n, int(self.index["n_tokens"])))
        if {k: v[:2] for k, v in header.tensors.items()} != want:
            raise self.mismatch(f"{path.name} does not hold {n} images of {self.index['dtype']} tokens of shape "
                                f"({self.index['n_tokens']}, {self.index['width']})")
        sidecar = read_json(self.path / sidecar_name(i))
        if sidecar is not None and sidecar.get("sha256") != entry["sha256"]:
            raise self.mismatch(f"the checksum of {path.name} differs between the index and its sidecar")
        return header

    def __len__(self) -> int:
        return int(self.index["n_images"])

    def __repr__(self) -> str:
        return (f"TokenStore({str(self.path)!r}: {len(self)} images, {len(self.shards)} shards, {self.dtype}, "
                f"{size_text(self.nbytes())})")

    def verify_shard(self, i: int) -> None:
        """Check shard i's sha256 against the index (a SelaggError names the shard)."""
        path = self.path / self.shards[i]["file"]
        if sha256_of(path) != self.shards[i]["sha256"]:
            raise SelaggError(f"The shard {path} does not match its checksum in the index (changed or damaged); "
                              f"{_REDO}.")
        remember_verified(path)

    def verify(self) -> None:
        """Check every shard's sha256 against the index."""
        for i in range(len(self.shards)):
            self.verify_shard(i)

    def shard_arrays(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Shard i's tokens (n, T, D) float16 and labels (n,): mapped from its file (int8 ones dequantised)."""
        path = self.path / self.shards[i]["file"]
        if self.verify_on_read:
            if _VERIFIED.get(str(path.resolve())) != file_stamp(path):
                self.verify_shard(i)
        state = mapped_tensors(path, self.headers[i])
        if self.dtype == "int8":
            return self.dequantised_tokens(state["tokens"], state["scales"]), state["labels"]
        return state["tokens"], state["labels"]

    def dequantised_tokens(self, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """float16 tokens from a shard's int8 ones, a chunk of images at a time."""
        out = torch.empty(q.shape, dtype=torch.float16)
        step = max(1, DEQUANTISE_BYTES // max(1, 4 * math.prod(q.shape[1:])))
        for a in range(0, len(q), step):
            out[a:a + step] = dequantized(q[a:a + step], scales[a:a + step])
        return out

    def part_shards(self, part: int, parts: int) -> list[int]:
        """The shards assigned to `part` of `parts` (shard i goes to part i % parts)."""
        parts = whole_number(parts, "parts", 1, "pass the number of processes that share the store")
        whole_number(part, "part", 0, "pass this process's rank")
        if part >= parts:
            raise SelaggError(f"part={part} is not accepted with parts={parts}: parts are numbered 0 to {parts - 1}; "
                              "pass the process's rank and the number of processes.")
        return list(range(part, len(self.shards), parts))

    def part_indices(self, part: int, parts: int) -> torch.Tensor:
        """The global image indices of that part, in order."""
        spans = [torch.arange(self.shards[i]["start"], self.shards[i]["stop"]) for i in self.part_shards(part, parts)]
        return torch.cat(spans) if spans else torch.empty(0, dtype=torch.int64)

    def token_set(self, part: int = 0, parts: int = 1) -> TokenSet:
        """Tokens (float16) and labels of the shards assigned to `part` of `parts`; part 0 of 1 = the whole split."""
        chosen = self.part_shards(part, parts)
        n = sum(self.shards[i]["stop"] - self.shards[i]["start"] for i in chosen)
        tokens = torch.empty((n, self.n_tokens, self.width), dtype=torch.float16)
        labels = torch.empty(n, dtype=torch.int64)
        at = 0
        for i in chosen:
            t, y = self.shard_arrays(i)
            tokens[at:at + len(y)], labels[at:at + len(y)] = t, y
            at += len(y)
        return self.as_token_set(tokens, labels, {"part": part, "parts": parts})

    def as_token_set(self, tokens: torch.Tensor, labels: torch.Tensor, extra: dict) -> TokenSet:
        """The one place that builds a TokenSet from the store's tokens and layout."""
        lay = self.layout
        return TokenSet(tokens, labels, lay.num_prefix_tokens, lay.has_cls, lay.grid_size,
                        {**self.identity, "store": str(self.path), **extra})

    def nbytes(self) -> int:
        """Bytes on disk: the shards, their sidecars and the index."""
        files = [self.path / INDEX_NAME] + [self.path / s["file"] for s in self.shards]
        files += [self.path / sidecar_name(i) for i in range(len(self.shards))]
        return sum(f.stat().st_size for f in files if f.is_file())
