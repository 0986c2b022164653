"""Lock files beside cache entries, so that processes filling one entry at once take turns.

One process extracts while the others wait and then load its entry; the kernel releases the lock of
a process that dies, and a later run deletes lock files no process holds.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent fills only repeat the work
    fcntl = None

__all__ = ["entries_locked", "remove_stale_locks"]


def _lock_file(path: Path) -> Path:
    """The lock file of an entry: `.<entry name>.lock` beside it."""
    return path.with_name(f".{path.name}.lock")


def _take_lock(lock: Path, wait: bool = True) -> int | None:
    """An open descriptor holding an exclusive flock on `lock` (None when busy and wait=False).

    A holder deletes its lock file before releasing it, so after the lock is taken the file is
    checked to still be the one locked; if not, the lock is taken again on the new file.
    """
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:  # another user's lock file in a shared folder: a read-only descriptor locks too
            fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:
            os.close(fd)
            raise
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return fd
        os.close(fd)


def _release_lock(lock: Path, fd: int) -> None:
    """Delete the lock file, then release the lock."""
    try:
        os.unlink(lock)
    except (FileNotFoundError, PermissionError):  # gone already, or another user's in a folder that keeps it
        pass
    os.close(fd)


@contextmanager
def entries_locked(paths: list[Path]) -> Iterator[None]:
    """Hold each entry's lock while it is filled, so that other processes wait and then load it.

    Locks are taken in one order (no deadlock) and released by the kernel if the process dies.
    Where the file system offers no locks, concurrent fills stay correct (each writes a whole file
    and renames it) and only repeat the work.
    """
    held: list[tuple[Path, int]] = []
    try:
        if fcntl is not None:
            for path in sorted(paths):
                lock = _lock_file(path)
                try:
                    held.append((lock, _take_lock(lock)))
                except OSError:  # no locks on this file system
                    break
        yield
    finally:
        for lock, fd in reversed(held):
            _release_lock(lock, fd)


def remove_stale_locks(folder: Path) -> None:
    """Delete lock files no process holds (left by a process that was killed)."""
    if fcntl is None:
        return
    for lock in folder.glob(".*.safetensors.lock"):
        try:
            fd = _take_lock(lock, wait=False)
        except OSError:
            continue
        if fd is not None:
            _release_lock(lock, fd)
