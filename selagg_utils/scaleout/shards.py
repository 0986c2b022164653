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
import os
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from ..cache.entries import float16_options
from ..cache.files import remove_orphaned_temporaries
from ..cache.keys import key_digest, size_text, token_shape
from ..checks import SelaggError, sha256_of, whole_number
from ..config import progress_bar
from ..extraction import ExtractOptions, check_extraction_inputs, extract_blocks
from ..features import TokenSet
from ..models import load_backbone, token_layout
from .distributed import barrier, current_process, gathered_objects
from .shard_files import (
    DEQUANTISE_BYTES,
    INDEX_NAME,
    REDO,
    SHARD_META,
    STORE_FORMAT,
    STORED_DTYPES,
    VERIFIED,
    ShardHeader,
    StoreOptions,
    atomic_write,
    check_disk_room,
    check_folder,
    checked_store,
    complete_shard,
    dequantized,
    file_stamp,
    identity_difference,
    index_from_sidecars,
    mapped_tensors,
    read_json,
    recorded_layout,
    remember_verified,
    shard_bytes,
    shard_header,
    shard_name,
    shard_ranges,
    sidecar_name,
    store_identity,
    write_shard,
)

__all__ = ["StoreOptions", "extract_to_store", "TokenStore"]


def extract_to_store(backbone: str | os.PathLike, dataset: Dataset, out: str | os.PathLike, *,
                     block: int | None = None, store: StoreOptions | None = None,
                     options: ExtractOptions | None = None, model: torch.nn.Module | None = None) -> TokenStore:
    """Extract a split's tokens into a sharded store, this process taking its share of the missing shards.

    Every process of the group calls it with the same arguments; each returns the finished store.
    `store` (None: `StoreOptions()`) sets the shard size, stored dtype and split name; `options` (None:
    `ExtractOptions()`, on this process's device) how the backbone runs, its progress bar counting shards
    on the main process; `model` replaces the weights `backbone` names.
    """
    info = current_process()
    store = checked_store(store)
    options = float16_options(options, "A token store")  # stored as store.dtype: float16, or int8 from float16
    check_extraction_inputs(dataset, options.batch_size)
    folder = Path(out)
    identity = store_identity(backbone, dataset, block=block, store=store, options=options, model=model)
    ranges = shard_ranges(len(dataset), store.shard_size)
    check_folder(folder, identity, ranges, store.shard_size)
    remove_orphaned_temporaries(folder)
    digest = key_digest(identity)
    mine = range(info.rank, len(ranges), info.world_size)
    unfinished = [i for i in mine if not complete_shard(folder, i, ranges[i], digest)]
    missing = sorted(i for part in gathered_objects(unfinished) for i in part)
    todo = missing[info.rank::info.world_size]  # the missing shards, shared out again: balanced on a resume
    if todo:
        net = model if model is not None else load_backbone(backbone, device=options.device)
        n_tokens, width = token_shape(net)  # room for every missing shard: the ranks share one folder
        check_disk_room(folder, sum(shard_bytes(ranges[i][1] - ranges[i][0], n_tokens, width, store.dtype)
                                    for i in missing))
        layout, quiet = token_layout(net), replace(options, progress=False)
        for i in progress_bar(todo, enabled=options.progress and info.is_main, desc="extracting shards"):
            tokens, labels = extract_blocks(net, Subset(dataset, range(*ranges[i])), [block], quiet)
            write_shard(folder, i, ranges[i], tokens[0], labels, identity, layout)
    barrier()
    if info.is_main:
        index = index_from_sidecars(folder, identity, ranges, store.shard_size)
        text = json.dumps(index, indent=1) + "\n"
        atomic_write(folder / INDEX_NAME, lambda tmp: Path(tmp).write_text(text))
    barrier()
    finished = TokenStore(folder, expect=identity)
    finished.extracted = tuple(missing)
    return finished


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
        self.layout = recorded_layout(index["layout"])
        self.width: int = int(index["width"])
        self.n_tokens: int = int(index["n_tokens"])
        self.dtype: str = index["dtype"]
        self.shards: list[dict] = index["shards"]
        self.headers = [self.checked_shard(i) for i in range(len(self.shards))]

    def mismatch(self, what: str) -> SelaggError:
        """The error for an index that does not describe its shards."""
        return SelaggError(f"The index of the token store {self.path} does not match its shards ({what}); {REDO}.")

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
                              f"its index lists; {REDO}.")
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
                              f"{REDO}.")
        remember_verified(path)

    def verify(self) -> None:
        """Check every shard's sha256 against the index."""
        for i in range(len(self.shards)):
            self.verify_shard(i)

    def shard_arrays(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Shard i's tokens (n, T, D) float16 and labels (n,): mapped from its file (int8 ones dequantised)."""
        path = self.path / self.shards[i]["file"]
        if self.verify_on_read:
            if VERIFIED.get(str(path.resolve())) != file_stamp(path):
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
        return TokenSet(tokens, labels, self.layout, {**self.identity, "store": str(self.path), **extra})

    def nbytes(self) -> int:
        """Bytes on disk: the shards, their sidecars and the index."""
        files = [self.path / INDEX_NAME] + [self.path / s["file"] for s in self.shards]
        files += [self.path / sidecar_name(i) for i in range(len(self.shards))]
        return sum(f.stat().st_size for f in files if f.is_file())
