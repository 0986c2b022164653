"""Tests of selagg_utils.bench and scripts/bench.py: clocks, FLOPs, memory, failures that must not end a ladder."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from selagg_utils import SelaggError, bench
from selagg_utils.models import tiny_vit

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_vit() -> nn.Module:
    torch.manual_seed(0)
    return tiny_vit(depth=1).eval().requires_grad_(False)


class RunsOutOfMemory(nn.Module):
    """A tiny ViT that raises a given out-of-memory error for batches larger than `limit`."""

    def __init__(self, limit: int, error: BaseException):
        super().__init__()
        self.vit = tiny_vit(depth=1).eval()
        self.patch_embed = self.vit.patch_embed
        self.limit, self.error = limit, error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > self.limit:
            raise self.error
        return self.vit(x)


# ---------------------------------------------------------------- devices

def test_unknown_device_is_one_clear_sentence():
    with pytest.raises(SelaggError, match="Unknown device 'tpu'"):
        bench.resolve_device("tpu")


def test_cuda_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SelaggError, match="no usable CUDA GPU"):
        bench.resolve_device("cuda")


def test_cpu_and_default_devices_resolve():
    assert bench.resolve_device("cpu") == CPU
    assert bench.resolve_device(None).type in ("cpu", "cuda")


def test_peaks_are_looked_up_by_gpu_name(monkeypatch):
    assert bench.lookup_peak("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.lookup_peak("NVIDIA H100 PCIe") == 756.0
    assert bench.lookup_peak("NVIDIA A100-SXM4-40GB") == 312.0
    assert bench.lookup_peak("Tesla T4") == 65.0
    assert bench.lookup_peak("NVIDIA L4") == 121.0
    assert bench.lookup_peak("NVIDIA L40S") == 362.0
    assert bench.lookup_peak("Tesla V100-SXM2-16GB") == 125.0
    assert bench.lookup_peak("Some Future GPU") is None
    monkeypatch.delenv(bench.PEAK_ENV_VAR, raising=False)
    assert bench.peak_tflops(CPU) is None
    assert bench.peak_tflops(CPU, override=50) == 50.0
    monkeypatch.setenv(bench.PEAK_ENV_VAR, "42")
    assert bench.peak_tflops(CPU) == 42.0


def test_unknown_precision_is_refused():
    with pytest.raises(SelaggError, match="Unknown precision"):
        bench.autocast(CPU, "int4")


# ---------------------------------------------------------------- clocks and memory

def test_time_calls_warms_up_then_times_each_repeat():
    calls = []
    times = bench.time_calls(lambda: calls.append(1), CPU, warmup=3, repeats=5)
    assert len(calls) == 8 and len(times) == 5 and all(t >= 0 for t in times)
    with pytest.raises(SelaggError):
        bench.time_calls(lambda: None, CPU, repeats=0)


def test_median_and_iqr():
    assert bench.median_and_iqr([1.0, 2.0, 3.0, 4.0, 5.0]) == (3.0, 2.0)
    assert bench.median_and_iqr([7.0]) == (7.0, 0.0)


def test_cpu_peak_memory_says_what_it_measures():
    with bench.peak_memory(CPU) as mem:
        block = torch.ones(2**22)  # 16 MB
    del block
    assert mem["mb"] > 16
    assert "RSS" in mem["kind"]


def test_out_of_memory_is_recognised():
    assert bench.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert bench.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert bench.is_out_of_memory(MemoryError())
    assert bench.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB"))
    assert not bench.is_out_of_memory(RuntimeError("shape mismatch"))


# ---------------------------------------------------------------- FLOPs and attention

def test_tiny_vit_flops_match_the_formula(small_vit):
    images = bench.random_images(small_vit, 2, CPU)
    d, n, p = 128, 65, 4  # width, tokens, patch size
    linear = n * (3 * d * d + d * d + 2 * 4 * d * d)  # qkv, proj, MLP
    attention = 2 * n * n * d  # q k^T and attention @ v
    patch_embed = 64 * d * p * p
    expected = 2 * (linear + attention + patch_embed)
    assert bench.forward_gflop_per_image(small_vit, images) * 1e9 == pytest.approx(expected, rel=1e-6)


def test_vit_b16_is_35_gflop_per_image():
    import timm

    model = timm.create_model("vit_base_patch16_224.mae", pretrained=False, num_classes=0).eval()
    gflop = bench.forward_gflop_per_image(model, torch.zeros(1, 3, 224, 224))
    assert gflop == pytest.approx(35.13, abs=0.05)  # 17.56 GMACs


def test_fused_attention_switch_restores_the_flags(small_vit):
    assert bench.uses_fused_attention(small_vit) in (True, False)
    before = [m.fused_attn for m in small_vit.modules() if hasattr(m, "fused_attn")]
    with bench.fused_attention(small_vit, False):
        assert not bench.uses_fused_attention(small_vit)
    with bench.fused_attention(small_vit, True):
        assert bench.uses_fused_attention(small_vit)
    assert [m.fused_attn for m in small_vit.modules() if hasattr(m, "fused_attn")] == before


def test_explicit_and_fused_attention_agree(small_vit):
    images = bench.random_images(small_vit, 4, CPU)
    with bench.fused_attention(small_vit, True):
        fused = small_vit(images)
    with bench.fused_attention(small_vit, False):
        explicit = small_vit(images)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- rows and tables

def test_measure_forward_gives_a_full_row(small_vit):
    images = bench.random_images(small_vit, 4, CPU)
    first = bench.measure_forward("fp32 eager", small_vit, images, "fp32", name="tiny", warmup=1, repeats=3)
    second = bench.measure_forward("bf16 autocast", small_vit, images, "bf16", name="tiny", warmup=1, repeats=3,
                                   versus=first)
    assert first.ok and first.repeats == 3 and first.images_per_s > 0 and first.gflop_per_image > 0
    assert first.pct_of_peak is None  # no known peak on a CPU
    assert second.versus == "fp32 eager"
    assert second.speedup == pytest.approx(second.images_per_s / first.images_per_s)
    row = bench.measure_forward("known peak", small_vit, images, "fp32", warmup=0, repeats=2, peak=1.0)
    assert row.pct_of_peak == pytest.approx(100 * row.tflops / 1.0)


def test_rows_print_as_a_table_and_survive_a_csv(tmp_path, small_vit):
    images = bench.random_images(small_vit, 2, CPU)
    rows = [bench.measure_forward("fp32 eager", small_vit, images, warmup=0, repeats=2),
            bench.failed_row("batch 4096", CPU, 4096, "out of memory")]
    table = bench.format_table(rows)
    assert "fp32 eager" in table and "out of memory" in table and "device:" in table
    path = bench.write_csv(rows, tmp_path / "run.csv")
    assert bench.read_csv(path) == rows
    assert bench.reference_runs(tmp_path) == {"run": rows}
    assert bench.reference_runs(tmp_path / "missing") == {}


def test_plot_rows_draws_one_bar_per_row(small_vit):
    images = bench.random_images(small_vit, 2, CPU)
    rows = [bench.measure_forward("fp32 eager", small_vit, images, warmup=0, repeats=2),
            bench.failed_row("skipped step", CPU, 2, "skipped: no compiler")]
    ax = bench.plot_rows(rows)
    try:
        assert len(ax.patches) == 2 and ax.get_xlabel()
    finally:
        import matplotlib.pyplot as plt

        plt.close(ax.figure)  # no figure left open for the tests that count open figures


def test_bad_sizes_are_refused(small_vit):
    with pytest.raises(SelaggError, match="batch size"):
        bench.random_images(small_vit, 0, CPU)
    with pytest.raises(SelaggError, match="steps"):
        bench.probe_data(small_vit, 4, 0, CPU)


# ---------------------------------------------------------------- out of memory in a sweep

@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB"),
                                   RuntimeError("CUDA error: out of memory")])
def test_sweep_marks_out_of_memory_and_goes_on(error):
    model = RunsOutOfMemory(limit=4, error=error)
    rows = bench.sweep_batch_sizes(model, [2, 8, 4], CPU, "fp32", warmup=0, repeats=2)
    assert [r.status for r in rows] == ["ok", "out of memory", "ok"]
    assert rows[1].images_per_s is None and rows[1].batch_size == 8


def test_sweep_does_not_hide_other_errors():
    model = RunsOutOfMemory(limit=4, error=RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes"):
        bench.sweep_batch_sizes(model, [8], CPU, "fp32", warmup=0, repeats=1)


# ---------------------------------------------------------------- torch.compile

def test_a_failing_compiler_skips_the_step_with_its_reason(small_vit):
    def broken(model):
        raise RuntimeError("backend 'inductor' is not available on this platform")

    images = bench.random_images(small_vit, 2, CPU)
    row, compiled = bench.measure_compiled("bf16 compiled", small_vit, images, "bf16", compiler=broken)
    assert compiled is None and not row.ok
    assert row.status.startswith("skipped: compilation failed (RuntimeError: backend 'inductor'")


def test_missing_cpp_compiler_skips_compilation(monkeypatch, small_vit):
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    reason = bench.compile_unavailable(CPU)
    assert "C++ compiler" in reason
    images = bench.random_images(small_vit, 2, CPU)
    row, compiled = bench.measure_compiled("compiled", small_vit, images, "fp32")
    assert compiled is None and row.status == f"skipped: {reason}"


def test_a_reason_to_skip_gives_a_skipped_row_without_compiling(small_vit):
    def refuse(model):
        raise AssertionError("must not compile")

    images = bench.random_images(small_vit, 2, CPU)
    row, compiled = bench.measure_compiled("compiled", small_vit, images, "fp32", compiler=refuse, skip="a rehearsal")
    assert compiled is None and row.status == "skipped: a rehearsal"


def test_missing_dynamo_support_skips_compilation(monkeypatch):
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    assert "does not support" in bench.compile_unavailable(CPU)


def test_a_working_compiler_is_timed_apart(small_vit):
    images = bench.random_images(small_vit, 2, CPU)
    row, compiled = bench.measure_compiled("compiled", small_vit, images, "fp32", compiler=lambda m: m,
                                           warmup=0, repeats=2)
    assert row.ok and compiled is small_vit and row.note.startswith("compiled in")


def test_backbone_ladder_goes_on_when_compilation_fails(small_vit):
    def broken(model):
        raise RuntimeError("no compiler")

    rows = bench.backbone_ladder(small_vit, CPU, 4, repeats=2, warmup=0, sweep=[2], compiler=broken)
    fast = bench.fastest_precision(rows)
    base = "fp32 eager" if fast == "fp32" else "bf16 autocast"
    assert [r.step for r in rows][:4] == ["fp32 eager", "bf16 autocast", f"{fast} explicit attention", f"{fast} compiled"]
    assert rows[3].status.startswith("skipped") and rows[4].ok and rows[4].batch_size == 2
    assert rows[1].versus == "fp32 eager" and rows[2].versus == base and rows[4].precision == fast


def test_half_precision_follows_the_books_one_rule(monkeypatch):
    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert bench.half_precision(gpu) == "fp16"  # a T4 only emulates bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert bench.half_precision(gpu) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert bench.half_precision(gpu) == "fp16" and bench.half_precision(CPU) == "bf16"  # CPUs autocast in bf16


def test_ladder_sizes_shrink_with_an_image_cap_or_on_a_cpu_at_full_scale(monkeypatch):
    from selagg_utils import config

    monkeypatch.delenv(config.MAX_IMAGES_VAR, raising=False)
    full, gpu = config.settings("full"), torch.device("cuda")
    assert bench.ladder_sizes(config.settings("tiny"), CPU) == bench.ladder_sizes(config.settings("tiny"), gpu)
    assert bench.ladder_sizes(full, gpu) == bench.FULL_SIZES and not bench.FULL_SIZES.quick
    assert bench.ladder_sizes(full, CPU).quick
    monkeypatch.setenv(config.MAX_IMAGES_VAR, "40")
    assert bench.ladder_sizes(config.settings("full"), gpu).quick
    assert bench.QUICK_SIZES.batch in bench.QUICK_SIZES.sweep and bench.QUICK_SIZES.skip_compile
    assert not bench.FULL_SIZES.skip_compile and not bench.TINY_SIZES.skip_compile


def test_fastest_precision_picks_the_faster_of_fp32_and_autocast():
    def row(step, precision, ips):
        return bench.BenchRow(step=step, device="cpu", model="m", batch_size=1, precision=precision, images_per_s=ips)

    assert bench.fastest_precision([row("fp32 eager", "fp32", 10.0), row("bf16 autocast", "bf16", 30.0)]) == "bf16"
    assert bench.fastest_precision([row("fp32 eager", "fp32", 10.0), row("bf16 autocast", "bf16", 5.0)]) == "fp32"
    assert bench.fastest_precision([]) == "fp32"


# ---------------------------------------------------------------- probes

def test_probes_of_each_kind_give_logits(small_vit):
    tokens = torch.randn(3, 65, 128)
    for kind in bench.PROBE_KINDS:
        assert bench.make_probe(kind, small_vit, 10)(tokens).shape == (3, 10)
    with pytest.raises(SelaggError, match="Unknown probe"):
        bench.make_probe("transformer", small_vit, 10)


@pytest.fixture(params=["probing", "fallback"])
def probing_module(request, monkeypatch):
    """Run a test with selagg_utils.probing, and again as if it were missing (the fallback bank)."""
    if request.param == "fallback":
        monkeypatch.setitem(sys.modules, "selagg_utils.probing", None)
    return request.param


def test_one_pass_over_many_lrs_equals_separate_runs(small_vit, probing_module):
    lrs = bench.learning_rates(3)
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1.0)
    torch.manual_seed(0)
    bank, opt = bench.probe_bank("abmilp", small_vit, 10, lrs)
    assert sorted({g["lr"] for g in opt.param_groups}) == sorted(lrs)
    singles = []
    for probe, lr in zip(bench.bank_members(bank), lrs):
        one, one_opt = bench.probe_bank("abmilp", small_vit, 10, [lr])
        bench.bank_members(one)[0].load_state_dict(probe.state_dict())
        singles.append((one, one_opt))
    tokens, labels = torch.randn(8, 65, 128), torch.randint(0, 10, (8,))
    for _ in range(2):
        bench.train_step_fn(bank, opt, "fp32")(tokens, labels)
        for one, one_opt in singles:
            bench.train_step_fn(one, one_opt, "fp32")(tokens, labels)
    for probe, (one, _) in zip(bench.bank_members(bank), singles):
        for a, b in zip(probe.parameters(), bench.bank_members(one)[0].parameters()):
            torch.testing.assert_close(a, b)


def test_probe_ladder_caches_and_compares(small_vit, probing_module):
    data = bench.probe_data(small_vit, 8, 2, CPU)
    rows = bench.probe_ladder(small_vit, data, "fp32", repeats=2, n_lrs=2)
    by_step = {r.step: r for r in rows}
    assert all(r.ok for r in rows)
    assert data.tokens.shape == (16, 65, 128)
    assert by_step["cached epoch, linear"].versus == "online epoch, linear"
    assert by_step["cached epoch, linear"].images_per_s > by_step["online epoch, linear"].images_per_s
    heads = [by_step[f"{k} head, cached epoch"] for k in ("linear", "abmilp", "attentive")]
    assert heads[0].params < heads[1].params < heads[2].params


# ---------------------------------------------------------------- the script

def load_script():
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_refuses_an_unknown_device(capsys):
    assert load_script().main(["--device", "tpu"]) == 2
    assert "Unknown device 'tpu'" in capsys.readouterr().err


def test_script_refuses_a_bad_sweep(capsys):
    assert load_script().main(["--device", "cpu", "--sweep", "64,big"]) == 2
    assert "--sweep" in capsys.readouterr().err


def test_script_prints_the_table_and_writes_csv(tmp_path, capsys):
    out = tmp_path / "tiny.csv"
    code = load_script().main(["--device", "cpu", "--model", "tiny-random", "--batch-size", "4", "--steps", "1",
                               "--sweep", "2", "--no-compile", "--no-probe", "--csv", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "fp32 eager" in printed and f"wrote {out}" in printed
    rows = bench.read_csv(out)
    assert [r.step for r in rows][:2] == ["fp32 eager", "bf16 autocast"] and rows[-1].batch_size == 2


# ---------------------------------------------------------------- on a GPU (skipped without one)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_cuda_events_time_and_memory_is_measured(small_vit):
    gpu = bench.resolve_device("cuda")
    model = small_vit.to(gpu)
    images = bench.random_images(model, 8, gpu)
    row = bench.measure_forward("bf16 autocast", model, images, bench.half_precision(gpu), warmup=1, repeats=3)
    assert row.ok and row.median_ms > 0 and row.memory_kind == "cuda max allocated" and row.memory_mb > 0
    assert row.device == torch.cuda.get_device_name(gpu)


@needs_cuda
def test_a_real_out_of_memory_error_is_marked_on_the_gpu(small_vit):
    gpu = bench.resolve_device("cuda")
    free, _ = torch.cuda.mem_get_info(gpu)
    too_big = int(free // (32 * 32 * 4)) * 2  # images whose bytes alone are twice the free memory
    rows = bench.sweep_batch_sizes(small_vit.to(gpu), [8, too_big], gpu, "fp32", warmup=0, repeats=1)
    assert [r.status for r in rows] == ["ok", "out of memory"]
