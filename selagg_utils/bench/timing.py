"""Honest clocks and counters: synchronised timings, medians and spread, memory peaks, FLOPs and parameters.

GPUs run kernels asynchronously, so every clock here waits for the device (`synchronize`) before it
reads the time. The same clock serves the package, the scripts and the chapters.
"""
from __future__ import annotations

import contextlib
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ..checks import SelaggError
from ..config import synchronize

__all__ = ["seconds", "wall_and_cpu_seconds", "time_calls", "median_and_iqr", "median_seconds",
           "peak_memory", "status_kib", "lifetime_peak_rss_bytes", "is_out_of_memory", "free_memory",
           "fused_attention", "uses_fused_attention", "eager", "count_flops", "forward_gflop_per_image",
           "count_params"]


# ---------------------------------------------------------------- clocks


def seconds(fn: Callable[[], object], device: torch.device | str) -> float:
    """Wall-clock seconds of one call of `fn`, the device synchronised before and after it."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def wall_and_cpu_seconds(fn: Callable[[], object], device: torch.device | str) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one synchronised call (CPU time is steadier on a shared machine)."""
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 10) -> list[float]:
    """Seconds per call of `fn` for `repeats` calls after `warmup` untimed ones (CUDA events on GPUs)."""
    if repeats < 1 or warmup < 0:
        raise SelaggError(f"Need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        return _time_with_events(fn, repeats)
    return [seconds(fn, device) for _ in range(repeats)]


def _time_with_events(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds per call measured between CUDA events recorded on the current stream."""
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in pairs]


def median_and_iqr(times: list[float]) -> tuple[float, float]:
    """The median and the interquartile range (75th minus 25th percentile) of some timings."""
    if len(times) < 2:
        return times[0], 0.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return statistics.median(times), q3 - q1


def median_seconds(fn: Callable[[], object], device: torch.device | str, repeats: int, warmup: int = 1) -> float:
    """The median of `repeats` synchronised calls of `fn`, after `warmup` untimed ones."""
    if repeats < 1 or warmup < 0:
        raise SelaggError(f"Need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    for _ in range(warmup):
        fn()
    return statistics.median(seconds(fn, device) for _ in range(repeats))


# ---------------------------------------------------------------- memory

@dataclass
class MemoryPeak:
    """The peak memory of a block in MB, what kind of peak it is, and the level at its start (None if unknown)."""

    mb: float | None = None
    kind: str = ""
    start_mb: float | None = None

    @property
    def growth_mb(self) -> float | None:
        """How far the peak rose above the level at the block's start."""
        return None if self.mb is None or self.start_mb is None else self.mb - self.start_mb


@contextlib.contextmanager
def peak_memory(device: torch.device | str) -> Iterator[MemoryPeak]:
    """Yield a MemoryPeak that holds, on exit, the highest memory in use during the block.

    CUDA: `torch.cuda.max_memory_allocated` (tensors torch allocated, reset at entry). CPU on Linux:
    the process's peak resident set (VmHWM), reset at entry through /proc/self/clear_refs, so it
    covers the block but counts everything the process holds (weights, Python, libraries).
    Elsewhere: `ru_maxrss`, the peak of the process's whole lifetime so far.
    """
    device = torch.device(device)
    result = MemoryPeak()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result.start_mb = torch.cuda.memory_allocated(device) / 2**20
        yield result
        synchronize(device)
        result.mb, result.kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
        return
    resettable = _reset_rss_peak()
    rss = status_kib("VmRSS") if resettable else None
    result.start_mb = rss / 1024 if rss is not None else None
    yield result
    synchronize(device)
    hwm = status_kib("VmHWM") if resettable else None
    if hwm is not None:
        result.mb, result.kind = hwm / 1024, "process peak RSS in step"
    else:
        result.mb, result.kind = lifetime_peak_rss_bytes() / 2**20, "process peak RSS, lifetime"
        result.start_mb = None


def _reset_rss_peak() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def status_kib(field: str) -> int | None:
    """A memory field of /proc/self/status in KiB ('VmRSS', 'VmHWM', 'RssAnon'), or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def lifetime_peak_rss_bytes() -> int:
    """The process's peak resident set over its whole lifetime in bytes (`ru_maxrss`)."""
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def is_out_of_memory(err: BaseException) -> bool:
    """Whether an exception means the device ran out of memory (CUDA, MPS or the CPU allocator)."""
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_memory(device: torch.device) -> None:
    """Return cached blocks to the device after an out-of-memory error."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- FLOPs and parameters

@contextlib.contextmanager
def fused_attention(model: nn.Module, enabled: bool) -> Iterator[nn.Module]:
    """Switch every timm Attention module's `fused_attn` (SDPA) on or off inside the block."""
    modules = [m for m in model.modules() if hasattr(m, "fused_attn")]
    before = [m.fused_attn for m in modules]
    for m in modules:
        m.fused_attn = enabled
    try:
        yield model
    finally:
        for m, b in zip(modules, before):
            m.fused_attn = b


def uses_fused_attention(model: nn.Module) -> bool:
    """Whether every timm Attention module of the model calls scaled_dot_product_attention."""
    flags = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    return bool(flags) and all(flags)


def eager(model: nn.Module) -> nn.Module:
    """The module behind a torch.compile wrapper (the module itself otherwise)."""
    return getattr(model, "_orig_mod", model)


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call of `fn` (a multiply-add is 2), from FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def forward_gflop_per_image(model: nn.Module, images: torch.Tensor) -> float:
    """GFLOP of one image through the model's forward, counted with explicit attention.

    FlopCounterMode does not count every fused attention kernel (the CPU one is missed), so the
    count runs the plain q k^T, softmax, v path, whose matmuls it sees.
    """
    base = eager(model)
    with fused_attention(base, False), torch.inference_mode():
        return count_flops(lambda: base(images[:1])) / 1e9


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """The number of parameters (all, or only those that require gradients)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
