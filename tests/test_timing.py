"""Tests of selagg_utils.bench.timing: synchronised clocks, medians, memory peaks, FLOP and parameter counts."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn

from selagg_utils import SelaggError
from selagg_utils.bench import timing

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures one_thread, small_vit: conftest.py


# ---------------------------------------------------------------- clocks

def test_the_clock_measures_the_call():
    # A sleep never ends early, so a clock that times the call cannot read less than it slept.
    assert timing.seconds(lambda: time.sleep(0.02), CPU) >= 0.02
    wall, cpu = timing.wall_and_cpu_seconds(lambda: time.sleep(0.02), "cpu")
    assert wall >= 0.02 and 0 <= cpu < wall  # sleeping costs no CPU time


def test_time_calls_warms_up_then_times_each_repeat():
    calls = []
    times = timing.time_calls(lambda: (calls.append(1), time.sleep(0.005)), CPU, warmup=3, repeats=5)
    assert len(calls) == 8 and len(times) == 5 and min(times) >= 0.005
    with pytest.raises(SelaggError):
        timing.time_calls(lambda: None, CPU, repeats=0)


def test_median_seconds_warms_up_and_takes_the_median():
    calls = []
    took = timing.median_seconds(lambda: (calls.append(1), time.sleep(0.01)), CPU, repeats=3, warmup=2)
    assert len(calls) == 5 and took >= 0.01
    with pytest.raises(SelaggError):
        timing.median_seconds(lambda: None, CPU, repeats=0)


def test_median_and_iqr():
    assert timing.median_and_iqr([1.0, 2.0, 3.0, 4.0, 5.0]) == (3.0, 2.0)
    assert timing.median_and_iqr([5.0, 1.0, 4.0, 2.0, 3.0]) == (3.0, 2.0)  # order does not matter
    assert timing.median_and_iqr([7.0]) == (7.0, 0.0)


# ---------------------------------------------------------------- memory

needs_proc = pytest.mark.skipif(timing.status_kib("VmRSS") is None, reason="needs Linux's /proc/self/status")


@needs_proc
def test_cpu_peak_memory_covers_the_block_and_is_reset_at_entry():
    mib = 128
    with timing.peak_memory(CPU) as big:
        block = torch.ones(mib * 2**18)  # 128 MiB of float32, every page touched
        del block
    with timing.peak_memory(CPU) as small:
        pass
    assert big.kind == small.kind == "process peak RSS in step"
    assert big.growth_mb > 0.9 * mib  # the block's tensor is in its peak
    assert small.growth_mb < 0.25 * mib  # and not in the next block's: the peak was reset at its entry
    assert small.mb < big.mb


def test_status_fields_and_the_lifetime_peak_are_consistent():
    rss = timing.status_kib("VmRSS")
    if rss is not None:
        assert timing.lifetime_peak_rss_bytes() >= rss * 1024 * 0.5
    assert timing.status_kib("NoSuchField") is None


def test_out_of_memory_is_recognised():
    assert timing.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert timing.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert timing.is_out_of_memory(MemoryError())
    assert timing.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB"))
    assert not timing.is_out_of_memory(RuntimeError("shape mismatch"))


# ---------------------------------------------------------------- FLOPs, parameters and attention

def test_tiny_vit_flops_match_the_formula(small_vit):
    images = torch.randn(2, 1, 32, 32)
    d, n, p = 128, 65, 4  # width, tokens, patch size
    linear = n * (3 * d * d + d * d + 2 * 4 * d * d)  # qkv, proj, MLP
    attention = 2 * n * n * d  # q k^T and attention @ v
    patch_embed = 64 * d * p * p
    expected = 2 * (linear + attention + patch_embed)
    assert timing.forward_gflop_per_image(small_vit, images) * 1e9 == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_vit_b16_is_35_gflop_per_image():
    import timm

    model = timm.create_model("vit_base_patch16_224.mae", pretrained=False, num_classes=0).eval()
    gflop = timing.forward_gflop_per_image(model, torch.zeros(1, 3, 224, 224))
    assert gflop == pytest.approx(35.13, abs=0.05)  # 17.56 GMACs


def test_parameters_are_counted_all_or_trainable_only():
    layer = nn.Linear(3, 4)  # 12 weights and 4 biases
    layer.bias.requires_grad_(False)
    assert timing.count_params(layer) == 16 and timing.count_params(layer, trainable_only=True) == 12


def test_fused_attention_switch_restores_the_flags_even_after_an_error(small_vit):
    before = [m.fused_attn for m in small_vit.modules() if hasattr(m, "fused_attn")]
    assert before  # timm's Attention modules carry the flag
    with timing.fused_attention(small_vit, False):
        assert not timing.uses_fused_attention(small_vit)
    with timing.fused_attention(small_vit, True):
        assert timing.uses_fused_attention(small_vit)
    with pytest.raises(ValueError), timing.fused_attention(small_vit, not before[0]):
        raise ValueError("a failure inside the block")
    assert [m.fused_attn for m in small_vit.modules() if hasattr(m, "fused_attn")] == before
    assert not timing.uses_fused_attention(nn.Linear(2, 2))  # no attention at all is not "fused"


def test_explicit_and_fused_attention_agree(small_vit):
    images = torch.randn(4, 1, 32, 32)
    with timing.fused_attention(small_vit, True):
        fused = small_vit(images)
    with timing.fused_attention(small_vit, False):
        explicit = small_vit(images)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-4)


def test_eager_unwraps_a_compiled_module():
    layer = nn.Linear(2, 2)
    wrapper = nn.Module()
    wrapper._orig_mod = layer  # what torch.compile's OptimizedModule holds
    assert timing.eager(wrapper) is layer and timing.eager(layer) is layer
