"""Chapter 07's ladder of backbone timings: one `BenchRow` per measured step, and CSV files of rows.

Every measurement becomes one `BenchRow`. A row names its device, its precision and the row it is
compared with, so a table of rows reads as a ladder: each step's speed-up over the step before it
and, where the device's peak is known, the share of that peak the step reached. Clocks and counters
live in `timing`, the device's name and peak in `hardware`, the probe-side rows in `probe_rows`, tables
and figures of rows in `report`.
"""
from __future__ import annotations

import contextlib
import csv
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn

from ..checks import SelaggError
from ..config import ScaleSettings, autocast, half_precision, resolve_device, synchronize
from .rows import BenchRow, MeasureOptions, failed_row, measure, random_images
from .timing import (
    count_params,
    eager,
    forward_gflop_per_image,
    free_memory,
    fused_attention,
    is_out_of_memory,
    uses_fused_attention,
)

__all__ = ["measure_forward", "measure_compiled", "sweep_batch_sizes", "LadderSizes", "ladder_sizes",
           "run_ladder", "write_csv", "reference_runs"]


# ---------------------------------------------------------------- measuring one step


def forward_fn(model: nn.Module, images: torch.Tensor, precision: str) -> Callable[[], torch.Tensor]:
    """A no-argument call of the model's inference forward on `images` in the given precision."""
    device = images.device

    def run() -> torch.Tensor:
        with torch.inference_mode(), autocast(device, precision):
            return model(images)

    return run


def measure_forward(step: str, model: nn.Module, images: torch.Tensor,
                    options: MeasureOptions = MeasureOptions()) -> BenchRow:
    """Time the inference forward of a backbone on one batch in `options.precision`.

    FLOPs are counted on a single image, parameters on the model, and a call processes the whole batch
    (these three fields of `options` are measured here, not read).
    """
    device = images.device
    gflop = forward_gflop_per_image(model, images)
    note = options.note
    if not note and not uses_fused_attention(eager(model)):
        note = "explicit attention"
    return measure(step, forward_fn(model, images, options.precision), device, len(images), replace(
        options, gflop_per_image=gflop, images_per_call=None, params=count_params(eager(model)), note=note))


# ---------------------------------------------------------------- torch.compile

def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot run on this device here, or None when it can."""
    if not hasattr(torch, "compile"):
        return "this PyTorch has no torch.compile (it needs PyTorch 2.0 or newer)"
    try:
        import importlib

        if not importlib.import_module("torch._dynamo").is_dynamo_supported():
            return f"torch.compile does not support Python {sys.version_info.major}.{sys.version_info.minor} on this platform"
    except ImportError as err:
        return f"torch.compile cannot load ({err})"
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
        return "torch.compile on CPU needs a C++ compiler (g++ or clang++) on the PATH, and none was found"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch.compile on CUDA needs the triton package, which is not installed"
    return None


def compile_model(model: nn.Module, example: Callable[[nn.Module], object], device: torch.device,
                  compiler: Callable[[nn.Module], nn.Module] | None = None) -> tuple[nn.Module | None, float, str]:
    """(compiled model, seconds spent compiling, reason) — the model is None and the reason says why when compiling fails.

    torch.compile is lazy: it compiles on the first call, so `example(compiled)` is run (and timed) here.
    """
    reason = compile_unavailable(device) if compiler is None else None
    if reason:
        return None, 0.0, reason
    compiler = compiler or torch.compile
    start = time.perf_counter()
    try:
        with _quiet_logger("torch.utils.cpp_extension"):  # "No CUDA runtime is found" on CPU-only machines
            compiled = compiler(model)
            example(compiled)
            synchronize(device)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # a backend failure must not end the ladder
        first_line = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        return None, 0.0, f"compilation failed ({type(err).__name__}: {first_line})"
    return compiled, time.perf_counter() - start, ""


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Silence a library logger's warnings inside the block."""
    import logging

    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def measure_compiled(step: str, model: nn.Module, images: torch.Tensor, options: MeasureOptions = MeasureOptions(),
                     *, compiler: Callable[[nn.Module], nn.Module] | None = None,
                     skip: str = "") -> tuple[BenchRow, nn.Module | None]:
    """Compile (timed apart), then time like `measure_forward`; a skipped row if it cannot compile or `skip` gives why not."""
    device, precision = images.device, options.precision
    if skip:
        return failed_row(step, device, len(images), f"skipped: {skip}", model=options.model,
                          precision=precision), None
    compiled, seconds, reason = compile_model(model, lambda m: forward_fn(m, images, precision)(), device, compiler)
    if compiled is None:
        return failed_row(step, device, len(images), f"skipped: {reason}", model=options.model,
                          precision=precision), None
    row = measure_forward(step, compiled, images,
                          replace(options, note=f"compiled in {seconds:.1f} s (first call, not timed)"))
    return row, compiled


# ---------------------------------------------------------------- batch-size sweep

def sweep_batch_sizes(model: nn.Module, sizes: Iterable[int], device: torch.device,
                      options: MeasureOptions = MeasureOptions(repeats=5), *, step: str = "batch") -> list[BenchRow]:
    """One forward row per batch size; a size that runs out of memory gives an 'out of memory' row and the sweep goes on."""
    rows = []
    for size in sizes:
        label = f"{step} {size}"
        try:
            images = random_images(model, size, device)
            row = measure_forward(label, model, images, options)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            row = failed_row(label, device, size, "out of memory", model=options.model, precision=options.precision,
                             note=f"{type(err).__name__}")
        finally:
            images = None
            free_memory(device)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- the whole ladder

def fp32_note(device: torch.device) -> str:
    """Whether fp32 matrix products may use TF32 tensor cores on this GPU (off by default in PyTorch)."""
    if device.type != "cuda":
        return ""
    return f"matmul TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"


@dataclass(frozen=True)
class LadderSizes:
    """How much the ladder times: images per call, timed calls per step after the warm-up calls, the batch sizes
    of the sweep, probe batches per epoch and epochs timed, and whether (and why not) to compile."""

    batch: int = 64
    repeats: int = 10
    warmup: int = 2
    sweep: tuple[int, ...] = ()
    probe_steps: int = 5
    probe_repeats: int = 3
    compiled_sweep: bool = False  # the sweep reuses the compiled model, compiling again for each new batch size
    skip_compile: str = ""  # why the compile step is left out ("" compiles)
    quick: bool = False


#: The tiny scale's sizes, the full ladder (a GPU without an image cap), and the quick rehearsal at full scale.
TINY_SIZES = LadderSizes(64, 5, 2, (8, 32, 128), 4, 3, compiled_sweep=False)
FULL_SIZES = LadderSizes(512, 20, 2, (64, 128, 256, 512, 1024, 2048), 10, 3, compiled_sweep=True)
QUICK_SIZES = LadderSizes(2, 3, 1, (1, 2), 2, 2, compiled_sweep=False, skip_compile="quick rehearsal", quick=True)


def backbone_ladder(model: nn.Module, device: torch.device, sizes: LadderSizes = LadderSizes(), *, name: str = "",
                    peak: float | None = None,
                    compiler: Callable[[nn.Module], nn.Module] | None = None) -> list[BenchRow]:
    """fp32 eager -> half-precision autocast -> explicit attention (the price of capturing maps) -> torch.compile -> batch sizes.

    After the second step the ladder keeps the faster precision, and compares later steps with that row.
    """
    images = random_images(model, sizes.batch, device)
    common = MeasureOptions(model=name, repeats=sizes.repeats, warmup=sizes.warmup, peak=peak)
    with fused_attention(model, True):
        fp32 = measure_forward("fp32 eager", model, images, replace(common, note=fp32_note(device)))
        half = half_precision(device)
        low = measure_forward(f"{half} autocast", model, images, replace(common, precision=half, versus=fp32))
    base = low if low.speedup and low.speedup > 1 else fp32
    fast = base.precision
    with fused_attention(model, False):
        explicit = measure_forward(f"{fast} explicit attention", model, images, replace(
            common, precision=fast, versus=base, note="attention maps materialised, as when capturing them"))
    rows = [fp32, low, explicit]
    best, best_model = base, model
    if not sizes.skip_compile:
        with fused_attention(model, True):
            compiled_row, compiled = measure_compiled(f"{fast} compiled", model, images,
                                                      replace(common, precision=fast, versus=base), compiler=compiler)
        rows.append(compiled_row)
        if compiled is not None and compiled_row.images_per_s > base.images_per_s:
            best, best_model = compiled_row, compiled
    images = None
    free_memory(device)
    if sizes.sweep:
        with fused_attention(model, True):
            rows += sweep_batch_sizes(best_model, list(sizes.sweep), device, replace(
                common, precision=fast, repeats=max(3, sizes.repeats // 2), versus=best), step=f"{best.step}, batch")
    return rows


def ladder_sizes(settings: ScaleSettings, device: torch.device | str) -> LadderSizes:
    """Chapter 07's sizes: tiny, the full ladder, or the quick rehearsal at full scale with an image cap or on a CPU."""
    if settings.scale != "full":
        return TINY_SIZES
    if settings.n_train is None and torch.device(device).type != "cpu":
        return FULL_SIZES
    return QUICK_SIZES


def fastest_precision(rows: list[BenchRow]) -> str:
    """The precision of the fastest 'fp32 eager' or '... autocast' row of a ladder."""
    candidates = [r for r in rows if r.ok and (r.step == "fp32 eager" or r.step.endswith(" autocast"))]
    return max(candidates, key=lambda r: r.images_per_s).precision if candidates else "fp32"


def run_ladder(model_name: str, device: str | torch.device | None = None, sizes: LadderSizes = LadderSizes(), *,
               probe: bool = True, peak: float | None = None) -> list[BenchRow]:
    """The whole chapter-07 ladder for a backbone name (weights are not needed: random ones time the same)."""
    from ..models import load_backbone

    dev = resolve_device(device)
    if sizes.batch < 1 or sizes.repeats < 1 or sizes.probe_steps < 1:
        raise SelaggError(f"Batch size, steps and probe steps must be positive integers, got batch={sizes.batch}, "
                          f"repeats={sizes.repeats}, probe_steps={sizes.probe_steps}.")
    model = load_backbone(model_name, pretrained=False, device=dev)
    rows = backbone_ladder(model, dev, sizes, name=model_name, peak=peak)
    if probe:
        from .probe_rows import probe_data, probe_ladder

        data = probe_data(model, sizes.batch, sizes.probe_steps, dev)
        rows += probe_ladder(model, data, MeasureOptions(model=model_name, precision=fastest_precision(rows),
                                                         repeats=sizes.probe_repeats, peak=peak))
    return rows


# ---------------------------------------------------------------- CSV files and reference runs

def write_csv(rows: list[BenchRow], path: str | os.PathLike) -> Path:
    """Write the rows to a CSV file (one column per BenchRow field) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(BenchRow)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    return path


def read_csv(path: str | os.PathLike) -> list[BenchRow]:
    """The rows of a CSV file written by `write_csv`."""
    types = {fl.name: fl.type for fl in fields(BenchRow)}
    rows = []
    with Path(path).open(newline="") as f:
        for record in csv.DictReader(f):
            rows.append(BenchRow(**{k: _parse(v, types[k]) for k, v in record.items() if k in types}))
    return rows


def _parse(text: str, annotation: str) -> object:
    """A CSV cell back in its field's type (empty means None for optional numbers)."""
    if "float" in annotation:
        return float(text) if text else None
    if "int" in annotation:
        return int(float(text)) if text else (None if "None" in annotation else 0)
    return text


def reference_folder() -> Path | None:
    """The book's `benchmarks/` folder of committed reference runs (beside the package, or above the working directory)."""
    candidates = [Path(__file__).resolve().parents[1] / "benchmarks", Path.cwd() / "benchmarks",
                  Path.cwd().parent / "benchmarks"]
    return next((p for p in candidates if p.is_dir()), None)


def reference_runs(folder: str | os.PathLike | None = None) -> dict[str, list[BenchRow]]:
    """Every reference CSV in a folder (default: `reference_folder()`), by file name; an empty dict when there is none."""
    folder = Path(folder) if folder is not None else reference_folder()
    if folder is None or not folder.is_dir():
        return {}
    return {p.stem: read_csv(p) for p in sorted(folder.glob("*.csv"))}
