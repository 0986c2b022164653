"""Tests of selagg_utils.bench, bench_report and scripts/bench.py: rows, tables, CSV, failures that must not end a ladder."""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from selagg_utils import SelaggError, config
from selagg_utils.bench import hardware, ladder
from selagg_utils.bench import report as bench_report
from selagg_utils.bench import rows as bench_rows
from selagg_utils.bench.rows import MeasureOptions as M
from selagg_utils.models import tiny_vit

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures one_thread, small_vit: conftest.py


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


# ---------------------------------------------------------------- rows and tables

def test_measure_forward_gives_a_full_row(small_vit):
    images = bench_rows.random_images(small_vit, 4, CPU)
    first = ladder.measure_forward("fp32 eager", small_vit, images, M(model="tiny", warmup=1, repeats=3))
    second = ladder.measure_forward("bf16 autocast", small_vit, images,
                                   M(model="tiny", precision="bf16", warmup=1, repeats=3, versus=first))
    assert first.ok and first.repeats == 3 and first.images_per_s > 0 and first.gflop_per_image > 0
    assert first.pct_of_peak is None  # no known peak on a CPU
    assert second.versus == "fp32 eager"
    assert second.speedup == pytest.approx(second.images_per_s / first.images_per_s)
    row = ladder.measure_forward("known peak", small_vit, images, M(warmup=0, repeats=2, peak=1.0))
    assert row.pct_of_peak == pytest.approx(100 * row.tflops / 1.0)


def test_measure_counts_the_images_of_a_call_and_says_what_it_measured():
    options = bench_rows.MeasureOptions(model="m", images_per_call=40, warmup=0, repeats=3, params=7, note="a note")
    row = bench_rows.measure("sleep", lambda: time.sleep(0.01), CPU, 4, options)
    assert row.ok and row.batch_size == 4 and row.repeats == 3 and row.params == 7 and row.note == "a note"
    assert row.median_ms >= 10 and row.images_per_s == pytest.approx(40 / (row.median_ms / 1e3))
    assert row.memory_mb > 0 and row.memory_kind.startswith("process peak RSS")
    assert row.device == hardware.device_name(CPU) and row.software == hardware.software_versions()
    faster = bench_rows.measure("faster", lambda: None, CPU, 4, bench_rows.MeasureOptions(warmup=0, repeats=3, versus=row))
    assert faster.versus == "sleep" and faster.speedup == pytest.approx(faster.images_per_s / row.images_per_s)


def test_rows_print_as_a_table_and_survive_a_csv(tmp_path, small_vit):
    images = bench_rows.random_images(small_vit, 2, CPU)
    rows = [ladder.measure_forward("fp32 eager", small_vit, images, M(warmup=0, repeats=2)),
            bench_rows.failed_row("batch 4096", CPU, 4096, "out of memory")]
    table = bench_report.format_table(rows)
    assert "fp32 eager" in table and "out of memory" in table and "device:" in table
    path = ladder.write_csv(rows, tmp_path / "run.csv")
    assert ladder.read_csv(path) == rows
    assert ladder.reference_runs(tmp_path) == {"run": rows}
    assert ladder.reference_runs(tmp_path / "missing") == {}


def test_plot_rows_draws_one_bar_per_row(small_vit):
    images = bench_rows.random_images(small_vit, 2, CPU)
    rows = [ladder.measure_forward("fp32 eager", small_vit, images, M(warmup=0, repeats=2)),
            bench_rows.failed_row("skipped step", CPU, 2, "skipped: no compiler")]
    ax = bench_report.plot_rows(rows)
    try:
        assert len(ax.patches) == 2 and ax.get_xlabel()
    finally:
        import matplotlib.pyplot as plt

        plt.close(ax.figure)  # no figure left open for the tests that count open figures


def test_bad_sizes_are_refused(small_vit):
    with pytest.raises(SelaggError, match="batch size"):
        bench_rows.random_images(small_vit, 0, CPU)


# ---------------------------------------------------------------- out of memory in a sweep

@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB"),
                                   RuntimeError("CUDA error: out of memory")])
def test_sweep_marks_out_of_memory_and_goes_on(error):
    model = RunsOutOfMemory(limit=4, error=error)
    rows = ladder.sweep_batch_sizes(model, [2, 8, 4], CPU, M(warmup=0, repeats=2))
    assert [r.status for r in rows] == ["ok", "out of memory", "ok"]
    assert rows[1].images_per_s is None and rows[1].batch_size == 8


def test_sweep_does_not_hide_other_errors():
    model = RunsOutOfMemory(limit=4, error=RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes"):
        ladder.sweep_batch_sizes(model, [8], CPU, M(warmup=0, repeats=1))


# ---------------------------------------------------------------- torch.compile

def test_a_failing_compiler_skips_the_step_with_its_reason(small_vit):
    def broken(model):
        raise RuntimeError("backend 'inductor' is not available on this platform")

    images = bench_rows.random_images(small_vit, 2, CPU)
    row, compiled = ladder.measure_compiled("bf16 compiled", small_vit, images, M(precision="bf16"), compiler=broken)
    assert compiled is None and not row.ok
    assert row.status.startswith("skipped: compilation failed (RuntimeError: backend 'inductor'")


def test_missing_cpp_compiler_skips_compilation(monkeypatch, small_vit):
    monkeypatch.setattr(ladder.shutil, "which", lambda name: None)
    reason = ladder.compile_unavailable(CPU)
    assert "C++ compiler" in reason
    images = bench_rows.random_images(small_vit, 2, CPU)
    row, compiled = ladder.measure_compiled("compiled", small_vit, images)
    assert compiled is None and row.status == f"skipped: {reason}"


def test_a_reason_to_skip_gives_a_skipped_row_without_compiling(small_vit):
    def refuse(model):
        raise AssertionError("must not compile")

    images = bench_rows.random_images(small_vit, 2, CPU)
    row, compiled = ladder.measure_compiled("compiled", small_vit, images, compiler=refuse, skip="a rehearsal")
    assert compiled is None and row.status == "skipped: a rehearsal"


def test_missing_dynamo_support_skips_compilation(monkeypatch):
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    assert "does not support" in ladder.compile_unavailable(CPU)


def test_a_working_compiler_is_timed_apart(small_vit):
    images = bench_rows.random_images(small_vit, 2, CPU)
    row, compiled = ladder.measure_compiled("compiled", small_vit, images, M(warmup=0, repeats=2),
                                           compiler=lambda m: m)
    assert row.ok and compiled is small_vit and row.note.startswith("compiled in")


def test_backbone_ladder_goes_on_when_compilation_fails(small_vit):
    def broken(model):
        raise RuntimeError("no compiler")

    rows = ladder.backbone_ladder(small_vit, CPU, ladder.LadderSizes(batch=4, repeats=2, warmup=0, sweep=(2,)),
                                 compiler=broken)
    fast = ladder.fastest_precision(rows)
    base = "fp32 eager" if fast == "fp32" else "bf16 autocast"
    assert [r.step for r in rows][:4] == ["fp32 eager", "bf16 autocast", f"{fast} explicit attention", f"{fast} compiled"]
    assert rows[3].status.startswith("skipped") and rows[4].ok and rows[4].batch_size == 2
    assert rows[1].versus == "fp32 eager" and rows[2].versus == base and rows[4].precision == fast


def test_ladder_sizes_shrink_with_an_image_cap_or_on_a_cpu_at_full_scale(monkeypatch):
    from selagg_utils import config

    monkeypatch.delenv(config.MAX_IMAGES_VAR, raising=False)
    full, gpu = config.settings("full"), torch.device("cuda")
    assert ladder.ladder_sizes(config.settings("tiny"), CPU) == ladder.ladder_sizes(config.settings("tiny"), gpu)
    assert ladder.ladder_sizes(full, gpu) == ladder.FULL_SIZES and not ladder.FULL_SIZES.quick
    assert ladder.ladder_sizes(full, CPU).quick
    monkeypatch.setenv(config.MAX_IMAGES_VAR, "40")
    assert ladder.ladder_sizes(config.settings("full"), gpu).quick
    assert ladder.QUICK_SIZES.batch in ladder.QUICK_SIZES.sweep and ladder.QUICK_SIZES.skip_compile
    assert not ladder.FULL_SIZES.skip_compile and not ladder.TINY_SIZES.skip_compile


def test_fastest_precision_picks_the_faster_of_fp32_and_autocast():
    def row(step, precision, ips):
        return bench_rows.BenchRow(step=step, device="cpu", model="m", batch_size=1, precision=precision, images_per_s=ips)

    assert ladder.fastest_precision([row("fp32 eager", "fp32", 10.0), row("bf16 autocast", "bf16", 30.0)]) == "bf16"
    assert ladder.fastest_precision([row("fp32 eager", "fp32", 10.0), row("bf16 autocast", "bf16", 5.0)]) == "fp32"
    assert ladder.fastest_precision([]) == "fp32"


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
    rows = ladder.read_csv(out)
    assert [r.step for r in rows][:2] == ["fp32 eager", "bf16 autocast"] and rows[-1].batch_size == 2


# ---------------------------------------------------------------- on a GPU (skipped without one)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_cuda_events_time_and_memory_is_measured(small_vit):
    gpu = config.resolve_device("cuda")
    model = small_vit.to(gpu)
    images = bench_rows.random_images(model, 8, gpu)
    row = ladder.measure_forward("bf16 autocast", model, images,
                                M(precision=config.half_precision(gpu), warmup=1, repeats=3))
    assert row.ok and row.median_ms > 0 and row.memory_kind == "cuda max allocated" and row.memory_mb > 0
    assert row.device == torch.cuda.get_device_name(gpu)


@needs_cuda
def test_a_real_out_of_memory_error_is_marked_on_the_gpu(small_vit):
    gpu = config.resolve_device("cuda")
    free, _ = torch.cuda.mem_get_info(gpu)
    too_big = int(free // (32 * 32 * 4)) * 2  # images whose bytes alone are twice the free memory
    rows = ladder.sweep_batch_sizes(small_vit.to(gpu), [8, too_big], gpu, M(warmup=0, repeats=1))
    assert [r.status for r in rows] == ["ok", "out of memory"]
