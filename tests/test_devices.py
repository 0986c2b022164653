"""Tests of the device questions (selagg_utils.config, selagg_utils.bench.hardware): device choice and names, peak tables, the one half-precision rule, autocast."""
from __future__ import annotations

import pytest
import torch

from selagg_utils import SelaggError, config
from selagg_utils.bench import hardware

CPU = torch.device("cpu")


def test_unknown_device_is_one_clear_sentence():
    with pytest.raises(SelaggError, match="Unknown device 'tpu'"):
        config.resolve_device("tpu")


def test_cuda_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SelaggError, match="no usable CUDA GPU"):
        config.resolve_device("cuda")
    assert config.resolve_device(None) == CPU  # nothing asked for: the CPU


def test_config_device_chooses_through_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert config.device() == CPU and config.device("cpu") == CPU
    with pytest.raises(SelaggError, match="no usable CUDA GPU"):
        config.device("cuda")
    assert config.half_dtype is config.half_dtype  # one rule for half precision


def test_cpu_name_gives_the_model_and_the_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert hardware.device_name(CPU) == f"{hardware.cpu_model()}, 1 threads"
        assert hardware.device_name("cpu") == hardware.device_name(CPU)
    finally:
        torch.set_num_threads(before)


def test_peaks_are_looked_up_by_gpu_name(monkeypatch):
    assert hardware.lookup_peak("NVIDIA H100 80GB HBM3") == 989.0
    assert hardware.lookup_peak("NVIDIA H100 PCIe") == 756.0
    assert hardware.lookup_peak("NVIDIA A100-SXM4-40GB") == 312.0
    assert hardware.lookup_peak("Tesla T4") == 65.0
    assert hardware.lookup_peak("NVIDIA L4") == 121.0
    assert hardware.lookup_peak("NVIDIA L40S") == 362.0
    assert hardware.lookup_peak("Tesla V100-SXM2-16GB") == 125.0
    assert hardware.lookup_peak("Some Future GPU") is None
    monkeypatch.delenv(hardware.PEAK_ENV_VAR, raising=False)
    assert hardware.peak_tflops(CPU) is None
    assert hardware.peak_tflops(CPU, override=50) == 50.0
    monkeypatch.setenv(hardware.PEAK_ENV_VAR, "42")
    assert hardware.peak_tflops(CPU) == 42.0


def test_half_precision_follows_the_books_one_rule(monkeypatch):
    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert config.half_precision(gpu) == "fp16"  # a T4 only emulates bf16
    assert config.half_dtype(gpu) is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert config.half_precision(gpu) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert config.half_precision(gpu) == "fp16" and config.half_precision(CPU) == "bf16"  # CPUs autocast in bf16
    assert config.half_dtype("cpu") is None


def test_autocast_computes_in_the_precision_named():
    a = torch.randn(8, 8)
    for precision, dtype in config.DTYPES.items():
        if precision == "fp16":
            continue  # CPU autocast to float16 is not available in every torch build
        with config.autocast(CPU, precision):
            assert (a @ a).dtype == dtype
    with pytest.raises(SelaggError, match="Unknown precision"):
        config.autocast(CPU, "int4")


def test_software_versions_name_torch_and_timm():
    import timm

    text = hardware.software_versions()
    assert f"torch {torch.__version__}" in text and f"timm {timm.__version__}" in text
