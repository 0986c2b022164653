"""Which device runs, what it is called, how fast it can be at best, and the precision it computes in.

One place for the device questions every measurement asks: the device asked for (checked to exist),
its readable name, its dense half-precision peak, its native half precision, the autocast context
of a precision name, and the library versions that shape a timing.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .errors import SelaggError

__all__ = ["GPU_PEAK_TFLOPS", "PRECISIONS", "DTYPES", "PEAK_ENV_VAR", "resolve_device", "device_name",
           "cpu_model", "peak_tflops", "lookup_peak", "half_dtype", "half_precision", "autocast",
           "software_versions"]

#: Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' data sheets: bf16, or fp16 on
#: cards without bf16. Matched in order against `torch.cuda.get_device_name`, so specific names first.
GPU_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("GH200", 989.0), ("H200", 989.0),
    ("A100", 312.0), ("A10", 125.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("RTX 4090", 165.0), ("V100", 125.0), ("T4", 65.0),
)
PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PEAK_ENV_VAR = "SELAGG_PEAK_TFLOPS"


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """The device asked for, after checking it exists here ('cpu', 'cuda', 'cuda:1', 'mps'); None picks cuda or cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise SelaggError(f"Unknown device {name!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SelaggError(f"Device {name!r} asked for but this machine has no usable CUDA GPU; "
                              "use --device cpu, or run on a machine with a GPU.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SelaggError(f"Device {name!r} does not exist: this machine has {torch.cuda.device_count()} "
                              f"CUDA GPU(s), numbered from 0.")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise SelaggError(f"Device {name!r} asked for but Apple's MPS backend is not available here; use 'cpu'.")
    elif device.type != "cpu":
        raise SelaggError(f"Device {name!r} is not supported by the book; use 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    return device


def device_name(device: torch.device | str) -> str:
    """A readable device name: the GPU's model, or the CPU's with its thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{cpu_model()}, {torch.get_num_threads()} threads"
    return device.type


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else the platform module)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "CPU"


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's dense bf16/fp16 peak in TFLOP/s: `override`, else $SELAGG_PEAK_TFLOPS, else GPU_PEAK_TFLOPS; None if unknown."""
    if override is not None:
        return float(override)
    if os.environ.get(PEAK_ENV_VAR):
        return float(os.environ[PEAK_ENV_VAR])
    if device.type != "cuda":
        return None
    return lookup_peak(torch.cuda.get_device_name(device))


def lookup_peak(gpu_name: str) -> float | None:
    """The first GPU_PEAK_TFLOPS entry whose key appears in a GPU name, else None."""
    return next((peak for key, peak in GPU_PEAK_TFLOPS if key.lower() in gpu_name.lower()), None)


def half_dtype(dev: torch.device | str) -> torch.dtype | None:
    """The half precision a device runs natively: bfloat16 where it is native, else float16 on CUDA; None on CPU.

    A T4 (compute capability 7.5) only emulates bfloat16, so it gets float16.
    """
    dev = torch.device(dev)
    if dev.type != "cuda":
        return None
    try:
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.3 has no including_emulation and reports native support only
        native_bf16 = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if native_bf16 else torch.float16


def half_precision(device: torch.device) -> str:
    """'fp16' on a CUDA GPU without native bf16 (`half_dtype`: a T4 only emulates it), else 'bf16' (CPUs too)."""
    return "fp16" if half_dtype(device) is torch.float16 else "bf16"


def autocast(device: torch.device, precision: str | torch.dtype | bool | None = None) -> contextlib.AbstractContextManager:
    """torch.autocast in a precision: 'bf16'/'fp16' or a dtype; 'fp32' or False: none; None: the device's native
    half precision (`half_dtype`: bf16, fp16 on a GPU that only emulates bf16, none on a CPU)."""
    device = torch.device(device)
    if precision is None:
        precision = half_dtype(device) or False
    if isinstance(precision, str):
        if precision not in PRECISIONS:
            raise SelaggError(f"Unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
        precision = False if precision == "fp32" else DTYPES[precision]
    if precision is False or precision is True:
        if precision:
            raise SelaggError("autocast=True is ambiguous; pass a dtype (torch.bfloat16), 'bf16'/'fp16', or None.")
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision)


def software_versions() -> str:
    """The versions that shape a timing: torch (with its CUDA) and timm."""
    import timm

    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda and torch.cuda.is_available() else ""
    return f"torch {torch.__version__}{cuda}, timm {timm.__version__}"
