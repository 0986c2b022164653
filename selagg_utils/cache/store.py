"""The cache's entry file (format 3): one safetensors file per entry, built in place and verified on load.

The tensors lie in the file in a fixed order (labels int64, then float32, then float16), the header is
padded with spaces so that they are aligned, and the checksum is the sha256 of the metadata (without
the checksum) and of each tensor's name, dtype, shape and digest, a tensor's digest being the sha256
of the sha256 of every 32 MiB piece of its bytes (so a large entry is verified on several cores,
streaming over the file in pieces).

An entry is built in a temporary file (on Linux an unnamed one, `O_TMPFILE`, which vanishes with a
killed process): the header first with a blank checksum, rows written at their offsets while their
bytes are hashed, the header rewritten in place at the end, then a rename gives it its final name. A
loaded entry maps the file (its tensors are copy-on-write views of the page cache): the package
replaces entries by renaming, never in place, and so should anyone else.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import secrets
import stat
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checks import SelaggError
from .files import DIGEST_PIECE, temporary_prefix

__all__ = ["entry_checksum", "DamagedEntry", "UnreadableEntry", "EntryFile", "VERIFY_EVERY_LOAD_BYTES",
           "read_entry"]

#: Build entries in unnamed temporary files (Linux `O_TMPFILE`, named at the end through /proc/self/fd)
#: where the system offers them; elsewhere in named temporary files.
UNNAMED_TEMPORARIES = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")


# ----------------------------------------------------------------------------- the checksum
class PieceDigest:
    """A tensor's digest fed in chunks of any size: sha256 of the sha256 of every DIGEST_PIECE bytes."""

    def __init__(self) -> None:
        self.pieces, self.piece, self.filled = hashlib.sha256(), hashlib.sha256(), 0

    def update(self, raw: memoryview) -> None:
        """Feed the next bytes."""
        while len(raw):
            take = min(len(raw), DIGEST_PIECE - self.filled)
            self.piece.update(raw[:take])
            self.filled, raw = self.filled + take, raw[take:]
            if self.filled == DIGEST_PIECE:
                self.pieces.update(self.piece.digest())
                self.piece, self.filled = hashlib.sha256(), 0

    def hexdigest(self) -> str:
        """The digest of every byte fed so far."""
        pieces = self.pieces.copy()
        if self.filled:
            pieces.update(self.piece.digest())
        return pieces.hexdigest()


def hashing_workers(n_pieces: int) -> int:
    """Threads that hash pieces at once (hashlib releases the GIL): up to 4, never more than the cores."""
    return max(1, min(n_pieces, 4, os.cpu_count() or 1))


def piece_digests(read: Callable[[int, int], bytes | memoryview], size: int) -> str:
    """The PieceDigest of `size` bytes, reading pieces with read(offset, length) on several threads."""
    starts = range(0, size, DIGEST_PIECE)

    def digest(start: int) -> bytes:
        return hashlib.sha256(read(start, min(DIGEST_PIECE, size - start))).digest()

    with ThreadPoolExecutor(hashing_workers(len(starts))) as pool:
        return hashlib.sha256(b"".join(pool.map(digest, starts))).hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes in memory order (copied only when it is not contiguous)."""
    t = tensor.detach().cpu().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def checksum_of(meta: dict[str, str], digests: dict[str, tuple[str, list[int], str]]) -> str:
    """Hex sha256 of an entry's metadata (without the checksum) and each tensor's (dtype, shape, digest)."""
    described = {"metadata": {k: v for k, v in meta.items() if k != "checksum"},
                 "tensors": {name: list(d) for name, d in digests.items()}}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def entry_checksum(state: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """The checksum of tensors in memory and their metadata, as a streamed entry stores it."""
    digests = {}
    for name, t in state.items():
        raw = tensor_bytes(t)
        digests[name] = (DTYPE_NAMES[t.dtype], list(t.shape), piece_digests(lambda s, n: raw[s:s + n], len(raw)))
    return checksum_of(meta, digests)


# ----------------------------------------------------------------------------- entries on disk
DTYPE_NAMES = {torch.int64: "I64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
_BLANK_CHECKSUM = "0" * 64
_ALIGN = 64


class DamagedEntry(Exception):
    """A cache entry that cannot be trusted (unreadable, truncated or changed); it is extracted again."""


class UnreadableEntry(DamagedEntry):
    """A cache entry this user may not read (another user's, in a shared folder); it is extracted again, not called
    damaged."""


def shared_mode(folder: Path) -> int:
    """The mode of a new entry: readable by whoever may write into its folder (the group of a group-writable
    folder, everyone in a world-writable one), else by its owner only."""
    mode = os.stat(folder).st_mode
    return 0o600 | (0o040 if mode & stat.S_IWGRP else 0) | (0o004 if mode & stat.S_IWOTH else 0)


@dataclass(frozen=True)
class EntryLayout:
    """Where an entry's tensors lie: data start in the file and, per name, (dtype, shape, start, end) in the data."""

    data_start: int
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]

    @property
    def size(self) -> int:
        """The file size this layout describes."""
        return self.data_start + max((end for *_, end in self.tensors.values()), default=0)


def planned_layout(shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]], meta: dict[str, str]) -> EntryLayout:
    """Tensors in a fixed order (largest element first, then by name), each aligned, after a padded header."""
    tensors, start = {}, 0
    for name in sorted(shapes, key=lambda n: (-shapes[n][0].itemsize, n)):
        dtype, shape = shapes[name]
        end = start + dtype.itemsize * math.prod(shape)
        tensors[name], start = (dtype, tuple(shape), start, end), end
    return EntryLayout(8 + len(header_bytes(EntryLayout(0, tensors), meta)), tensors)


def header_bytes(layout: EntryLayout, meta: dict[str, str]) -> bytes:
    """The safetensors header (JSON, padded with spaces so that the data starts on a 64-byte boundary)."""
    header = {"__metadata__": meta, **{name: {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                                              "data_offsets": [start, end]}
                                       for name, (dtype, shape, start, end) in layout.tensors.items()}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-(8 + len(raw)) % _ALIGN)


_POSITIONED_IO = threading.Lock()  # seek-then-read/write where the OS has no pread/pwrite (Windows)


def _pwrite(fd: int, raw: memoryview, offset: int) -> int:
    """os.pwrite, or a seek and a write under a lock where it is missing."""
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, raw, offset)
    with _POSITIONED_IO:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, raw)


def _pread(fd: int, length: int, offset: int) -> bytes:
    """os.pread, or a seek and a read under a lock where it is missing."""
    if hasattr(os, "pread"):
        return os.pread(fd, length, offset)
    with _POSITIONED_IO:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, length)


def write_all(fd: int, raw: memoryview | bytes, offset: int) -> None:
    """Write every byte at `offset` (a short write is continued; a disk that takes nothing is an OSError)."""
    raw = memoryview(raw).cast("B")
    while len(raw):
        n = _pwrite(fd, raw, offset)
        if n == 0:
            raise OSError(28, os.strerror(28))
        raw, offset = raw[n:], offset + n


def read_exactly(fd: int, length: int, offset: int) -> bytes:
    """`length` bytes at `offset` (in as many reads as it takes), or a DamagedEntry when the file ends first."""
    parts, done = [], 0
    while done < length:
        part = _pread(fd, min(length - done, 1 << 30), offset + done)
        if not part:
            raise DamagedEntry("unreadable: it ends early")
        parts.append(part)
        done += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def mapped_state(fd: int, layout: EntryLayout) -> dict[str, torch.Tensor]:
    """The tensors of an entry as copy-on-write views of its file (nothing is read until they are used)."""
    if layout.size == layout.data_start:
        return {name: torch.empty(shape, dtype=dtype) for name, (dtype, shape, _, _) in layout.tensors.items()}
    mapping = mmap.mmap(fd, layout.size, access=mmap.ACCESS_COPY)
    state = {}
    for name, (dtype, shape, start, end) in layout.tensors.items():
        count = (end - start) // dtype.itemsize
        state[name] = (torch.frombuffer(mapping, dtype=dtype, count=count, offset=layout.data_start + start)
                       .view(shape) if count else torch.empty(shape, dtype=dtype))
    return state


def temporary_file(path: Path) -> tuple[int, Path | None]:
    """An open file in the entry's folder to build it in: unnamed where possible (then None), else a named temporary."""
    if UNNAMED_TEMPORARIES:
        try:
            return os.open(path.parent, os.O_TMPFILE | os.O_RDWR, 0o600), None
        except OSError:  # this file system has no unnamed files
            pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path), suffix=".tmp")
    return fd, Path(tmp)


def named_temporary(fd: int, path: Path) -> Path:
    """Give an unnamed file a temporary name beside `path` (the name a later run recognises as an orphan)."""
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while True:
            tmp = path.with_name(f"{temporary_prefix(path)}{secrets.token_hex(4)}.tmp")
            try:
                os.link(f"/proc/self/fd/{fd}", tmp.name, dst_dir_fd=folder, follow_symlinks=True)
                return tmp
            except FileExistsError:
                continue
    finally:
        os.close(folder)


class EntryFile:
    """An entry being built: header first (blank checksum), rows streamed in and hashed, header rewritten, renamed."""

    def __init__(self, path: Path, shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]], meta: dict[str, str]):
        self.path, self.meta = path, {**meta, "checksum": _BLANK_CHECKSUM}
        self.layout = planned_layout(shapes, self.meta)
        self.rows = {name: 0 for name in shapes}
        self.digests = {name: PieceDigest() for name in shapes}
        self.fd, self.tmp = temporary_file(path)
        try:
            header = self.layout_header()
            write_all(self.fd, len(header).to_bytes(8, "little") + header, 0)
        except BaseException:
            self.discard()
            raise

    def layout_header(self) -> bytes:
        """The header for the current metadata (the same length whatever the checksum)."""
        return header_bytes(EntryLayout(0, self.layout.tensors), self.meta)

    def row_bytes(self, name: str) -> int:
        """Bytes of one row (one image) of a tensor."""
        dtype, shape, _, _ = self.layout.tensors[name]
        return dtype.itemsize * math.prod(shape[1:])

    def write(self, name: str, rows: torch.Tensor) -> None:
        """Append rows (images) to a tensor, at its offset in the file, and hash them."""
        dtype, shape, start, _ = self.layout.tensors[name]
        if rows.dtype != dtype or tuple(rows.shape[1:]) != shape[1:] or self.rows[name] + len(rows) > shape[0]:
            raise SelaggError(f"Rows {tuple(rows.shape)} {rows.dtype} do not fit the entry's {name} {shape} {dtype} "
                              f"after {self.rows[name]} rows; a dataset must yield exactly len(dataset) items of one "
                              "shape (check its __len__ and transform).")
        raw = tensor_bytes(rows)
        write_all(self.fd, raw, self.layout.data_start + start + self.rows[name] * self.row_bytes(name))
        self.digests[name].update(raw)
        self.rows[name] += len(rows)

    def written(self, name: str, n_rows: int) -> torch.Tensor:
        """The first n_rows rows of a tensor, read back into memory."""
        dtype, shape, start, _ = self.layout.tensors[name]
        if n_rows == 0:
            return torch.empty((0, *shape[1:]), dtype=dtype)
        raw = bytearray(read_exactly(self.fd, n_rows * self.row_bytes(name), self.layout.data_start + start))
        return torch.frombuffer(raw, dtype=dtype).view(n_rows, *shape[1:])

    def publish(self) -> dict[str, torch.Tensor]:
        """Complete the header with the checksum, give the file its final name, and return its tensors mapped."""
        expected = next(iter(self.layout.tensors.values()))[1][0]
        got = min(self.rows.values())
        if got != expected:
            raise SelaggError(f"The dataset gave {got} items although its length is {expected}; a dataset must "
                              "yield exactly len(dataset) items (check its __len__).")
        self.meta["checksum"] = checksum_of(self.meta, {
            name: (DTYPE_NAMES[dtype], list(shape), self.digests[name].hexdigest())
            for name, (dtype, shape, _, _) in self.layout.tensors.items()})
        write_all(self.fd, self.layout_header(), 8)
        os.fchmod(self.fd, shared_mode(self.path.parent))
        if self.tmp is None:
            self.tmp = named_temporary(self.fd, self.path)
        os.replace(self.tmp, self.path)
        self.tmp = None
        state = mapped_state(self.fd, self.layout)
        self.discard()
        return state

    def mapped(self) -> dict[str, torch.Tensor]:
        """The tensors written so far, mapped from the file (which need not have a name)."""
        return mapped_state(self.fd, self.layout)

    def discard(self) -> None:
        """Close the file and remove its temporary name, if any (an unnamed file vanishes when closed)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.tmp is not None:
            try:
                os.remove(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None


def entry_layout(fd: int, file_size: int) -> tuple[EntryLayout, dict[str, str]]:
    """An entry's layout and metadata from its header, or a DamagedEntry when they do not describe the file."""
    size = int.from_bytes(read_exactly(fd, 8, 0), "little")
    if size > min(file_size - 8, 100 << 20):
        raise DamagedEntry("unreadable: its header length does not fit the file")
    try:
        header = json.loads(read_exactly(fd, size, 8).decode("utf-8"))
        meta = header.pop("__metadata__", {})
        tensors = {}
        for name, info in header.items():
            dtype, shape, (start, end) = DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
            if not all(isinstance(x, int) and x >= 0 for x in (*shape, start, end)):
                raise ValueError("negative or fractional sizes")
            tensors[name] = (dtype, shape, start, end)
    except DamagedEntry:
        raise
    except Exception as err:  # not UTF-8, not JSON, or not safetensors' fields
        raise DamagedEntry(f"unreadable: {type(err).__name__} in its header") from None
    layout, offset = EntryLayout(8 + size, tensors), 0
    for dtype, shape, start, end in sorted(tensors.values(), key=lambda t: t[2]):
        if start != offset or end - start != dtype.itemsize * math.prod(shape):
            raise DamagedEntry("unreadable: its header does not describe its bytes")
        offset = end
    if layout.size != file_size or not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise DamagedEntry("unreadable: its header does not describe its bytes")
    return layout, meta


def file_checksum(fd: int, layout: EntryLayout, meta: dict[str, str]) -> str:
    """The checksum of an entry on disk, streaming over its file in pieces (on several threads)."""
    digests = {}
    for name, (dtype, shape, start, end) in layout.tensors.items():
        at = layout.data_start + start
        digests[name] = (DTYPE_NAMES[dtype], list(shape),
                         piece_digests(lambda s, n, at=at: read_exactly(fd, n, at + s), end - start))
    return checksum_of(meta, digests)


#: Entries up to this size are verified on every load (see scripts/bench_cache.py for the cost); a larger
#: one is verified on its first load in a process and again whenever its size, mtime or inode change.
VERIFY_EVERY_LOAD_BYTES = 4 << 30
_VERIFIED_LARGE: dict[str, tuple[int, int, int]] = {}


def read_entry(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An entry's tensors (mapped) and metadata, verified against its checksum; DamagedEntry when they do not match."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except PermissionError as err:
        raise UnreadableEntry(err.strerror or "permission denied") from None
    except OSError as err:
        raise DamagedEntry(f"unreadable: {type(err).__name__}") from None
    try:
        info = os.fstat(fd)
        layout, meta = entry_layout(fd, info.st_size)
        stamp = (info.st_size, info.st_mtime_ns, info.st_ino)
        large = info.st_size > VERIFY_EVERY_LOAD_BYTES
        if not (large and _VERIFIED_LARGE.get(str(path)) == stamp):
            if meta.get("checksum") != file_checksum(fd, layout, meta):
                raise DamagedEntry("its checksum does not match its content")
            if large:
                _VERIFIED_LARGE[str(path)] = stamp
        return mapped_state(fd, layout), meta
    except (OSError, ValueError) as err:  # ValueError: mmap of a file that shrank meanwhile
        raise DamagedEntry(f"unreadable: {type(err).__name__}") from None
    finally:
        os.close(fd)
