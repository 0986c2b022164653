"""Processes working together: which one this is, the backend they talk over, and joining their group."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from .errors import SelaggError

__all__ = ["ProcessInfo", "check_backend", "process_group"]


@dataclass(frozen=True)
class ProcessInfo:
    """This process's rank among world_size processes and the device it computes on."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes results and prints."""
        return self.rank == 0


def check_backend(backend: str | None) -> str:
    """The backend to use ('gloo' or 'nccl'; None: nccl with GPUs, else gloo); SelaggError if the machine lacks it."""
    if backend is None:
        return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise SelaggError(f"Unknown backend {backend!r}; choose 'gloo' (CPUs) or 'nccl' (CUDA GPUs).")
    if backend == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        raise SelaggError("NCCL needs CUDA GPUs and this machine has none; start with --backend gloo.")
    if backend == "gloo" and not dist.is_gloo_available():
        raise SelaggError("This torch build has no gloo backend; install a torch build with torch.distributed.")
    return backend


@contextmanager
def process_group(backend: str | None = None) -> Iterator[ProcessInfo]:
    """Join torchrun's process group (env RANK/WORLD_SIZE/MASTER_ADDR...), or act as one process outside torchrun."""
    backend = check_backend(backend)
    if "RANK" not in os.environ or dist.is_initialized():
        if dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        else:
            rank, world = 0, 1
        yield ProcessInfo(rank, world, torch.device("cuda" if backend == "nccl" else "cpu"))
        return
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    dist.init_process_group(backend)
    try:
        yield ProcessInfo(dist.get_rank(), dist.get_world_size(), device)
    finally:
        dist.destroy_process_group()
