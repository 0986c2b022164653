"""Writing files so that no reader ever sees half of one: atomic writes through a temporary file, the
clean-up of temporaries whose writer died, and the digests that identify tensors and check entries.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

__all__ = ["temporary_prefix", "remove_orphaned_temporaries", "_atomic_write", "update_digest",
           "DIGEST_PIECE", "tensors_digest"]

#: A temporary file's name: `.<final name>.<host>-<pid>.<random>.tmp`, so that a later run can tell an
#: orphan (its writer is gone) from a file another process is writing right now.
TEMPORARY = re.compile(r"^\.(?P<final>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[^.]+\.tmp$")


def host_tag() -> str:
    """Eight hex digits that name this machine in temporary file names."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temporary_prefix(path: Path) -> str:
    """The start of the name of a temporary file written on the way to `path`."""
    return f".{path.name}.{host_tag()}-{os.getpid()}."


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def remove_orphaned_temporaries(folder: Path, max_age_s: float = 86400.0) -> list[Path]:
    """Delete temporary files whose writer died (this machine) or that are older than a day (other machines)."""
    removed = []
    for tmp in folder.glob(".*.tmp"):
        match = TEMPORARY.match(tmp.name)
        try:
            if match and match["host"] == host_tag():
                orphan = not process_alive(int(match["pid"]))
            else:
                orphan = time.time() - tmp.stat().st_mtime > max_age_s
            if orphan:
                tmp.unlink()
                removed.append(tmp)
        except (FileNotFoundError, PermissionError):  # renamed or removed meanwhile; another user's, in a shared folder
            continue
    return removed


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: no half-written file survives."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def update_digest(digest: "hashlib._Hash", name: str, tensor: torch.Tensor) -> None:
    """Feed a tensor's name, dtype, shape and bytes to a running hash."""
    t = tensor.detach().cpu().contiguous()
    digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


#: Tensors are hashed in pieces of this many bytes, on all cores at once (hashlib releases the GIL).
DIGEST_PIECE = 1 << 25


def tensors_digest(tensors: dict[str, torch.Tensor], extra: str = "") -> str:
    """Hex sha256 of named tensors and an optional text: of each tensor's name, dtype and shape, and of the
    sha256 of every 32 MiB piece of its bytes (the pieces are hashed in parallel)."""
    digest = hashlib.sha256(extra.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        raw = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        pieces = [raw[i:i + DIGEST_PIECE] for i in range(0, len(raw), DIGEST_PIECE)]
        workers = min(len(pieces), os.cpu_count() or 1)
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                hashes = list(pool.map(lambda piece: hashlib.sha256(piece).digest(), pieces))
        else:
            hashes = [hashlib.sha256(piece).digest() for piece in pieces]
        for h in hashes:
            digest.update(h)
    return digest.hexdigest()
