"""The machine a benchmark ran on: the device's readable name, its dense half-precision peak, the CPU
model and the library versions that shape a timing.
"""
from __future__ import annotations

import os

import torch

__all__ = ["GPU_PEAK_TFLOPS", "device_name", "peak_tflops", "software_versions"]

#: Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' data sheets: bf16, or fp16 on
#: cards without bf16. Matched in order against `torch.cuda.get_device_name`, so specific names first.
GPU_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("GH200", 989.0), ("H200", 989.0),
    ("A100", 312.0), ("A10", 125.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("RTX 4090", 165.0), ("V100", 125.0), ("T4", 65.0),
)


PEAK_ENV_VAR = "SELAGG_PEAK_TFLOPS"


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


def software_versions() -> str:
    """The versions that shape a timing: torch (with its CUDA) and timm."""
    import timm

    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda and torch.cuda.is_available() else ""
    return f"torch {torch.__version__}{cuda}, timm {timm.__version__}"
