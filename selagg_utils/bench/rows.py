"""One measured step of a benchmark as a `BenchRow`: its clock, its memory peak and, where the
device's peak is known, the share of it the step reached.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from ..checks import SelaggError
from .hardware import device_name, peak_tflops, software_versions
from .timing import eager, median_and_iqr, peak_memory, time_calls

__all__ = ["BenchRow", "MeasureOptions", "measure", "failed_row", "random_images"]


@dataclass
class BenchRow:
    """One measured step; `speedup` is images/s over the images/s of the row named in `versus`."""

    step: str
    device: str
    model: str
    batch_size: int
    precision: str
    status: str = "ok"
    median_ms: float | None = None
    iqr_ms: float | None = None
    repeats: int = 0
    images_per_s: float | None = None
    gflop_per_image: float | None = None
    tflops: float | None = None
    peak_tflops: float | None = None
    pct_of_peak: float | None = None
    memory_mb: float | None = None
    memory_kind: str = ""
    params: int | None = None
    versus: str = ""
    speedup: float | None = None
    note: str = ""
    software: str = field(default_factory=lambda: software_versions())

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def compared_with(self, other: "BenchRow | None") -> "BenchRow":
        """This row with its speed-up over `other` filled in."""
        if other is None or not (self.ok and other.ok and other.images_per_s):
            return self
        return replace(self, versus=other.step, speedup=self.images_per_s / other.images_per_s)


@dataclass(frozen=True)
class MeasureOptions:
    """How one step is labelled and timed: `images_per_call` defaults to the batch size, `versus` is the row compared with."""

    model: str = ""
    precision: str = "fp32"
    gflop_per_image: float | None = None
    images_per_call: int | None = None
    versus: BenchRow | None = None
    warmup: int = 2
    repeats: int = 10
    params: int | None = None
    peak: float | None = None
    note: str = ""


def measure(step: str, fn: Callable[[], object], device: torch.device, batch_size: int,
            options: MeasureOptions = MeasureOptions()) -> BenchRow:
    """Time `fn` (one call processes `options.images_per_call` images, default `batch_size`) and return its row."""
    o = options
    images = o.images_per_call or batch_size
    with peak_memory(device) as mem:
        times = time_calls(fn, device, o.warmup, o.repeats)
    median, iqr = median_and_iqr(times)
    ips = images / median
    top = peak_tflops(device, o.peak)
    tflops = o.gflop_per_image * ips / 1e3 if o.gflop_per_image else None
    row = BenchRow(step=step, device=device_name(device), model=o.model, batch_size=batch_size, precision=o.precision,
                   median_ms=median * 1e3, iqr_ms=iqr * 1e3, repeats=len(times), images_per_s=ips,
                   gflop_per_image=o.gflop_per_image, tflops=tflops, peak_tflops=top,
                   pct_of_peak=100 * tflops / top if tflops and top else None,
                   memory_mb=mem.mb, memory_kind=mem.kind, params=o.params, note=o.note)
    return row.compared_with(o.versus)


def failed_row(step: str, device: torch.device, batch_size: int, status: str, *, model: str = "",
               precision: str = "fp32", note: str = "") -> BenchRow:
    """A row for a step that did not run (out of memory, or skipped with a reason)."""
    return BenchRow(step=step, device=device_name(device), model=model, batch_size=batch_size, precision=precision,
                    status=status, note=note)


def random_images(model: nn.Module, batch_size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """A batch of random images the size the model expects (timing does not depend on pixel values)."""
    if batch_size < 1:
        raise SelaggError(f"The batch size must be a positive integer, got {batch_size}.")
    base = eager(model)
    height, width = base.patch_embed.img_size
    channels = base.patch_embed.proj.in_channels
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: no host copy of a huge batch
    return torch.randn(batch_size, channels, height, width, generator=gen, device=device)
