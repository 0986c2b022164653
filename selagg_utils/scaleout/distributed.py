"""Several processes on one job: join `torchrun`'s process group, or act as the one process without it.

`torchrun --nproc_per_node=N script.py` starts N copies of a script and tells each its place through
environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `process_group` reads
them, joins the group (gloo on CPUs, NCCL on CUDA GPUs) and leaves it on exit; started without
torchrun, it is one process of one and needs no group at all, so the same code runs both ways.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..checks import SelaggError
from ..config import PROCESS_DEVICES, process_device

__all__ = ["process_group", "barrier", "gathered_objects"]

#: The process-group backends the package uses: gloo (CPUs, everywhere) and NCCL (CUDA GPUs).
BACKENDS = ("gloo", "nccl")


def check_backend(backend: str | None) -> str:
    """The backend to use ('gloo' or 'nccl'; None picks nccl with GPUs, else gloo); SelaggError when the machine
    lacks it."""
    if backend is None:
        return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend not in BACKENDS:
        raise SelaggError(f"The process-group backend {backend!r} is not one the package uses; choose 'gloo' (CPUs) "
                          "or 'nccl' (CUDA GPUs), or leave it out to pick by the machine.")
    if backend == "nccl" and not torch.cuda.is_available():
        raise SelaggError("NCCL needs CUDA GPUs and this machine has none; start with --backend gloo (or leave the "
                          "backend out to pick by the machine).")
    if backend == "nccl" and not dist.is_nccl_available():
        raise SelaggError("This build of torch has no NCCL; start with --backend gloo, or install a CUDA build of "
                          "torch.")
    if backend == "gloo" and not dist.is_gloo_available():
        raise SelaggError("This build of torch has no gloo backend; install torch from pytorch.org (its builds for "
                          "Linux, macOS and Windows all include gloo).")
    return backend


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place in the job: rank, number of processes, and the device it computes on."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes shared files and prints summaries."""
        return self.rank == 0


def _device_for(backend: str, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK under NCCL, else the CPU."""
    return torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")


def current_process() -> ProcessInfo:
    """This process's place: from the process group when one is joined, else rank 0 of 1 on what
    `config.process_device` says (the device `process_group` gave inside it, else the CPU)."""
    if dist.is_available() and dist.is_initialized():
        return ProcessInfo(dist.get_rank(), dist.get_world_size(), process_device())
    return ProcessInfo(0, 1, process_device())


def under_torchrun() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


@contextmanager
def process_group(backend: str | None = None) -> Iterator[ProcessInfo]:
    """Join torchrun's process group (env RANK/WORLD_SIZE/MASTER_ADDR...) or act as one process when not under
    torchrun; destroy the group on exit (a group joined before is reused and left alone)."""
    backend = check_backend(backend)
    if dist.is_initialized():
        yield current_process()
        return
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = _device_for(backend, local)
    if not under_torchrun():
        PROCESS_DEVICES.append(device)
        try:
            yield ProcessInfo(0, 1, device)
        finally:
            PROCESS_DEVICES.pop()
        return
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise SelaggError(f"LOCAL_RANK {local} has no GPU: this machine has {torch.cuda.device_count()}; start "
                              "torchrun with --nproc_per_node no larger than the number of GPUs.")
        torch.cuda.set_device(device)
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    try:
        yield ProcessInfo(dist.get_rank(), dist.get_world_size(), device)
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process of the group (nothing to wait for without one)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def gathered_objects(value: object) -> list:
    """Every process's `value` (picklable), in rank order; [value] without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
