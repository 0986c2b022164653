"""Honest timing of backbones and probes: warm-up, synchronised clocks, medians, FLOPs and memory.

Every measurement becomes one `BenchRow`. A row names its device, its precision and the row it is
compared with, so a table of rows reads as a ladder: each step's speed-up over the step before it
and, where the device's peak is known, the share of that peak the step reached.
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import resource
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .config import ScaleSettings, half_dtype
from .errors import SelaggError

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


# ---------------------------------------------------------------- devices, clocks and memory

def software_versions() -> str:
    """The versions that shape a timing: torch (with its CUDA) and timm."""
    import timm

    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda and torch.cuda.is_available() else ""
    return f"torch {torch.__version__}{cuda}, timm {timm.__version__}"


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
        raise SelaggError(f"Device {name!r} is not supported by these benchmarks; use 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    return device


def device_name(device: torch.device) -> str:
    """A readable device name: the GPU's model, or the CPU's with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{_cpu_model()}, {torch.get_num_threads()} threads"
    return device.type


def _cpu_model() -> str:
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


def half_precision(device: torch.device) -> str:
    """'fp16' on a CUDA GPU without native bf16 (`config.half_dtype`: a T4 only emulates it), else 'bf16' (CPUs too)."""
    return "fp16" if half_dtype(device) is torch.float16 else "bf16"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast for 'bf16'/'fp16', nothing for 'fp32'."""
    if precision not in PRECISIONS:
        raise SelaggError(f"Unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def synchronize(device: torch.device) -> None:
    """Wait until the device has finished the work queued so far (kernels run asynchronously on GPUs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 10) -> list[float]:
    """Seconds per call of `fn` for `repeats` calls after `warmup` untimed ones (CUDA events on GPUs)."""
    if repeats < 1 or warmup < 0:
        raise SelaggError(f"Need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        return _time_with_events(fn, repeats)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


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


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Yield a dict that holds, on exit, the peak memory in MB of the block and what kind of peak it is.

    CUDA: `torch.cuda.max_memory_allocated` (tensors torch allocated, reset at entry). CPU on Linux:
    the process's peak resident set (VmHWM), reset at entry through /proc/self/clear_refs, so it
    covers the block but counts everything the process holds (weights, Python, libraries).
    Elsewhere: `ru_maxrss`, the peak of the process's whole lifetime so far.
    """
    result: dict = {"mb": None, "kind": ""}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        synchronize(device)
        result.update(mb=torch.cuda.max_memory_allocated(device) / 2**20, kind="cuda max allocated")
        return
    resettable = _reset_rss_peak()
    yield result
    if resettable and (mb := _vm_hwm_mb()) is not None:
        result.update(mb=mb, kind="process peak RSS in step")
    else:
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        result.update(mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20,
                      kind="process peak RSS, lifetime")


def _reset_rss_peak() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm_mb() -> float | None:
    """The process's peak RSS in MB from /proc/self/status, or None."""
    try:
        with open("/proc/self/status") as f:
            line = next(l for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024


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


# ---------------------------------------------------------------- FLOPs and attention

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


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call of `fn` (a multiply-add is 2), from FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def eager(model: nn.Module) -> nn.Module:
    """The module behind a torch.compile wrapper (the module itself otherwise)."""
    return getattr(model, "_orig_mod", model)


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


# ---------------------------------------------------------------- measuring one step

def measure(step: str, fn: Callable[[], object], device: torch.device, batch_size: int, *, model: str = "",
            precision: str = "fp32", gflop_per_image: float | None = None, images_per_call: int | None = None,
            versus: BenchRow | None = None, warmup: int = 2, repeats: int = 10, params: int | None = None,
            peak: float | None = None, note: str = "") -> BenchRow:
    """Time `fn` (one call processes `images_per_call` images, default `batch_size`) and return its row."""
    images = images_per_call or batch_size
    with peak_memory(device) as mem:
        times = time_calls(fn, device, warmup, repeats)
    median, iqr = median_and_iqr(times)
    ips = images / median
    top = peak_tflops(device, peak)
    tflops = gflop_per_image * ips / 1e3 if gflop_per_image else None
    row = BenchRow(step=step, device=device_name(device), model=model, batch_size=batch_size, precision=precision,
                   median_ms=median * 1e3, iqr_ms=iqr * 1e3, repeats=len(times), images_per_s=ips,
                   gflop_per_image=gflop_per_image, tflops=tflops, peak_tflops=top,
                   pct_of_peak=100 * tflops / top if tflops and top else None,
                   memory_mb=mem["mb"], memory_kind=mem["kind"], params=params, note=note)
    return row.compared_with(versus)


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


def forward_fn(model: nn.Module, images: torch.Tensor, precision: str) -> Callable[[], torch.Tensor]:
    """A no-argument call of the model's inference forward on `images` in the given precision."""
    device = images.device

    def run() -> torch.Tensor:
        with torch.inference_mode(), autocast(device, precision):
            return model(images)

    return run


def measure_forward(step: str, model: nn.Module, images: torch.Tensor, precision: str = "fp32", *,
                    name: str = "", versus: BenchRow | None = None, warmup: int = 2, repeats: int = 10,
                    peak: float | None = None, note: str = "") -> BenchRow:
    """Time the inference forward of a backbone on one batch; FLOPs are counted on a single image."""
    device = images.device
    gflop = forward_gflop_per_image(model, images)
    if not note and not uses_fused_attention(eager(model)):
        note = "explicit attention"
    return measure(step, forward_fn(model, images, precision), device, len(images), model=name,
                   precision=precision, gflop_per_image=gflop, versus=versus, warmup=warmup, repeats=repeats,
                   params=count_params(eager(model)), peak=peak, note=note)


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


def measure_compiled(step: str, model: nn.Module, images: torch.Tensor, precision: str, *, name: str = "",
                     versus: BenchRow | None = None, warmup: int = 2, repeats: int = 10, peak: float | None = None,
                     compiler: Callable[[nn.Module], nn.Module] | None = None,
                     skip: str = "") -> tuple[BenchRow, nn.Module | None]:
    """Compile (timed apart), then time like `measure_forward`; a skipped row if it cannot compile or `skip` gives why not."""
    device = images.device
    if skip:
        return failed_row(step, device, len(images), f"skipped: {skip}", model=name, precision=precision), None
    compiled, seconds, reason = compile_model(model, lambda m: forward_fn(m, images, precision)(), device, compiler)
    if compiled is None:
        return failed_row(step, device, len(images), f"skipped: {reason}", model=name, precision=precision), None
    row = measure_forward(step, compiled, images, precision, name=name, versus=versus, warmup=warmup,
                          repeats=repeats, peak=peak, note=f"compiled in {seconds:.1f} s (first call, not timed)")
    return row, compiled


# ---------------------------------------------------------------- batch-size sweep

def sweep_batch_sizes(model: nn.Module, sizes: Iterable[int], device: torch.device, precision: str, *,
                      name: str = "", step: str = "batch", warmup: int = 2, repeats: int = 5,
                      peak: float | None = None, versus: BenchRow | None = None) -> list[BenchRow]:
    """One forward row per batch size; a size that runs out of memory gives an 'out of memory' row and the sweep goes on."""
    rows = []
    for size in sizes:
        label = f"{step} {size}"
        try:
            images = random_images(model, size, device)
            row = measure_forward(label, model, images, precision, name=name, warmup=warmup, repeats=repeats,
                                  peak=peak, versus=versus)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            row = failed_row(label, device, size, "out of memory", model=name, precision=precision,
                             note=f"{type(err).__name__}")
        finally:
            images = None
            free_memory(device)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- the probe side

def pooling_head(kind: str, model: nn.Module) -> nn.Module:
    """The pooling head of a probe kind: 'linear' pools the [cls] token, 'abmilp' and 'attentive' are learned."""
    from .aggregation import head_for_model

    if kind not in PROBE_KINDS:
        raise SelaggError(f"Unknown probe {kind!r}; choose one of {', '.join(PROBE_KINDS)}.")
    return head_for_model("cls" if kind == "linear" else kind, eager(model))


PROBE_KINDS = ("linear", "abmilp", "attentive")


def make_probe(kind: str, model: nn.Module, num_classes: int) -> nn.Module:
    """One probe for a backbone's tokens: the pooling head, then BatchNorm1d without affine and Linear."""
    try:
        from .probing import ProbeHead
    except ImportError:
        return _Probe(pooling_head(kind, model), eager(model).embed_dim, num_classes)
    return ProbeHead(pooling_head(kind, model), num_classes)


def probe_bank(kind: str, model: nn.Module, num_classes: int, lrs: list[float],
               device: torch.device | str = "cpu") -> tuple[nn.Module, torch.optim.Optimizer]:
    """len(lrs) probes of one kind trained together, and one LARS optimizer with a parameter group per lr.

    Uses `probing.ProbeStack` (the probes computed in one batched call) and `probing.make_optimizer`,
    or a plain list of probes where those are not available.
    """
    try:
        from .probing import ProbeRecipe, ProbeStack, make_optimizer
    except ImportError:
        bank = _ProbeList([make_probe(kind, model, num_classes) for _ in lrs]).to(device)
        return bank, _lars([{"params": list(p.parameters()), "lr": lr} for p, lr in zip(bank_members(bank), lrs)])
    stack = ProbeStack([make_probe(kind, model, num_classes) for _ in lrs]).to(device)
    return stack, make_optimizer(stack, ProbeRecipe(optimizer="lars"), list(lrs))


def bank_members(bank: nn.Module) -> list[nn.Module]:
    """The individual probes of a bank."""
    return list(getattr(bank, "heads", None) or getattr(bank, "probes"))


def learning_rates(count: int, low: float = 1e-3, high: float = 1.0) -> list[float]:
    """`count` learning rates spaced evenly on a log scale from `low` to `high`."""
    if count == 1:
        return [math.sqrt(low * high)]
    return [low * (high / low) ** (i / (count - 1)) for i in range(count)]


class _Probe(nn.Module):
    """Fallback probe: pooling head, BatchNorm1d without affine, Linear."""

    def __init__(self, pool: nn.Module, dim: int, num_classes: int):
        super().__init__()
        self.pool, self.bn, self.linear = pool, nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(self.pool(tokens)[0]))


class _ProbeList(nn.Module):
    """Fallback bank: the probes one after the other on the same batch, logits (K, B, classes)."""

    def __init__(self, probes: list[nn.Module]):
        super().__init__()
        self.probes = nn.ModuleList(probes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.stack([p(tokens) for p in self.probes])


def _lars(groups: list[dict]) -> torch.optim.Optimizer:
    """LARS with momentum 0.9 and no weight decay, as in MAE's linear probing."""
    from timm.optim import Lars

    return Lars(groups, lr=groups[0]["lr"], momentum=0.9, weight_decay=0.0)


def train_step_fn(bank: nn.Module, optimizer: torch.optim.Optimizer, precision: str) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One optimisation step of every probe in a bank on one token batch.

    The probes share no parameters, so the sum of their losses gives each exactly its own gradient.
    """

    def step(tokens: torch.Tensor, labels: torch.Tensor) -> None:
        with autocast(tokens.device, precision):
            logits = bank(tokens)  # (K, B, classes)
        k = logits.shape[0]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.repeat(k), reduction="sum") / len(labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def backbone_tokens(model: nn.Module, images: torch.Tensor, precision: str) -> torch.Tensor:
    """The frozen backbone's output tokens (after the final norm), without gradients."""
    with torch.no_grad(), autocast(images.device, precision):
        return eager(model).forward_features(images)


def cache_tokens(model: nn.Module, batches: list[torch.Tensor], precision: str) -> torch.Tensor:
    """All output tokens of some image batches, kept on their device in the run's precision (a feature cache in memory)."""
    dtype = DTYPES[precision]
    return torch.cat([backbone_tokens(model, x, precision).to(dtype) for x in batches])


@dataclass
class ProbeData:
    """Random images, labels and their cached tokens: `steps` batches of one size on one device."""

    images: list[torch.Tensor]
    labels: list[torch.Tensor]
    tokens: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return len(self.labels[0])

    @property
    def num_images(self) -> int:
        return sum(len(y) for y in self.labels)

    def token_batches(self) -> list[torch.Tensor]:
        """The cached tokens split back into batches."""
        return list(self.tokens.split(self.batch_size))


def probe_data(model: nn.Module, batch_size: int, steps: int, device: torch.device, num_classes: int = 10) -> ProbeData:
    """`steps` random batches with random labels (timing does not depend on what the images show)."""
    if steps < 1:
        raise SelaggError(f"The number of steps must be a positive integer, got {steps}.")
    gen = torch.Generator().manual_seed(1)
    images = [random_images(model, batch_size, device, seed=i) for i in range(steps)]
    labels = [torch.randint(0, num_classes, (batch_size,), generator=gen).to(device) for _ in range(steps)]
    return ProbeData(images, labels)


def online_epoch_fn(model: nn.Module, step: Callable, data: ProbeData, precision: str) -> Callable[[], None]:
    """One epoch as the paper's reference code runs it: the frozen backbone on every batch, then the probe step."""

    def epoch() -> None:
        for x, y in zip(data.images, data.labels):
            step(backbone_tokens(model, x, precision), y)

    return epoch


def cached_epoch_fn(step: Callable, data: ProbeData) -> Callable[[], None]:
    """One epoch on cached tokens: only the probe step."""
    batches = data.token_batches()

    def epoch() -> None:
        for tokens, y in zip(batches, data.labels):
            step(tokens, y)

    return epoch


def training_gflop_per_image(step: Callable, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    """GFLOP per image of one probe training step (forward, backward and update), counted on two images."""
    n = min(2, len(labels))
    return count_flops(lambda: step(tokens[:n], labels[:n])) / 1e9 / n


def measure_epoch(step_name: str, epoch: Callable[[], None], data: ProbeData, device: torch.device, *, name: str,
                  precision: str, gflop_per_image: float | None, params: int | None, versus: BenchRow | None,
                  repeats: int, peak: float | None, note: str = "") -> BenchRow:
    """Time whole epochs (one warm-up epoch, then `repeats`); images/s counts every image of the epoch."""
    return measure(step_name, epoch, device, data.batch_size, model=name, precision=precision,
                   gflop_per_image=gflop_per_image, images_per_call=data.num_images, versus=versus, warmup=1,
                   repeats=repeats, params=params, peak=peak, note=note)


def online_vs_cached(model: nn.Module, data: ProbeData, precision: str, *, name: str = "", num_classes: int = 10,
                     repeats: int = 3, peak: float | None = None) -> list[BenchRow]:
    """Three rows: filling the token cache once, an online epoch (backbone on every batch) and a cached epoch of a linear probe."""
    device = data.images[0].device
    gflop_backbone = forward_gflop_per_image(model, data.images[0])
    bank, opt = probe_bank("linear", model, num_classes, learning_rates(1), device)
    step = train_step_fn(bank, opt, precision)
    params = count_params(bank)

    def fill_cache() -> None:
        data.tokens = cache_tokens(model, data.images, precision)

    cache_row = measure("cache tokens (once)", fill_cache, device, data.batch_size, model=name, precision=precision,
                        gflop_per_image=gflop_backbone, images_per_call=data.num_images, warmup=0, repeats=1, peak=peak,
                        note=f"{data.num_images} images kept on {device.type} in {precision}")
    head_gflop = training_gflop_per_image(step, data.token_batches()[0], data.labels[0])
    common = dict(name=name, precision=precision, repeats=repeats, peak=peak, params=params)
    online = measure_epoch("online epoch, linear", online_epoch_fn(model, step, data, precision), data, device,
                           gflop_per_image=gflop_backbone + head_gflop, versus=None,
                           note="backbone forward on every batch", **common)
    cached = measure_epoch("cached epoch, linear", cached_epoch_fn(step, data), data, device,
                           gflop_per_image=head_gflop, versus=online, note="probe step only", **common)
    return [cache_row, online, cached]


def one_vs_many_lrs(model: nn.Module, data: ProbeData, precision: str, *, n_lrs: int = 8, name: str = "",
                    num_classes: int = 10, repeats: int = 3, peak: float | None = None) -> list[BenchRow]:
    """Two rows on cached tokens: `n_lrs` linear probes trained one pass each, then all in one pass."""
    device = data.images[0].device
    if data.tokens is None:
        data.tokens = cache_tokens(model, data.images, precision)
    lrs = learning_rates(n_lrs)
    bank, opt = probe_bank("linear", model, num_classes, lrs, device)
    step = train_step_fn(bank, opt, precision)
    gflop = training_gflop_per_image(step, data.token_batches()[0], data.labels[0])
    common = dict(name=name, precision=precision, repeats=repeats, peak=peak, params=count_params(bank),
                  gflop_per_image=gflop)
    separate = measure_epoch(f"{n_lrs} lrs, {n_lrs} cached passes", _sequential_lrs_fn(model, data, precision,
                             num_classes, lrs), data, device, versus=None, note="one probe per pass", **common)
    together = measure_epoch(f"{n_lrs} lrs, one cached pass", cached_epoch_fn(step, data), data, device,
                             versus=separate, note="one optimizer, a parameter group per lr", **common)
    return [separate, together]


def probe_ladder(model: nn.Module, data: ProbeData, precision: str, *, name: str = "", num_classes: int = 10,
                 repeats: int = 3, peak: float | None = None, heads: tuple[str, ...] = ("linear", "abmilp", "attentive"),
                 n_lrs: int = 8) -> list[BenchRow]:
    """The probe side of the ladder: online vs cached epochs, one vs many learning rates in one pass, and the heads."""
    common = dict(name=name, num_classes=num_classes, repeats=repeats, peak=peak)
    return (online_vs_cached(model, data, precision, **common) + one_vs_many_lrs(model, data, precision, n_lrs=n_lrs, **common)
            + compare_heads(model, data, precision, heads=heads, **common))


def _sequential_lrs_fn(model: nn.Module, data: ProbeData, precision: str, num_classes: int,
                       lrs: list[float]) -> Callable[[], None]:
    """One cached epoch per learning rate, one probe at a time (the loop a multi-lr pass replaces)."""
    steps = [train_step_fn(*probe_bank("linear", model, num_classes, [lr], data.images[0].device), precision) for lr in lrs]
    epochs = [cached_epoch_fn(s, data) for s in steps]

    def all_epochs() -> None:
        for epoch in epochs:
            epoch()

    return all_epochs


def compare_heads(model: nn.Module, data: ProbeData, precision: str, *,
                  heads: tuple[str, ...] = ("linear", "abmilp", "attentive"), name: str = "",
                  num_classes: int = 10, repeats: int = 3, peak: float | None = None) -> list[BenchRow]:
    """A cached epoch of each probe head: time, memory and parameter count, each against the first head."""
    device = data.images[0].device
    if data.tokens is None:
        data.tokens = cache_tokens(model, data.images, precision)
    rows: list[BenchRow] = []
    for kind in heads:
        try:
            bank, opt = probe_bank(kind, model, num_classes, learning_rates(1), device)
        except ImportError as err:
            rows.append(failed_row(f"{kind} head, cached epoch", device, data.batch_size, f"skipped: {err}",
                                   model=name, precision=precision))
            continue
        step = train_step_fn(bank, opt, precision)
        gflop = training_gflop_per_image(step, data.token_batches()[0], data.labels[0])
        rows.append(measure_epoch(f"{kind} head, cached epoch", cached_epoch_fn(step, data), data, device, name=name,
                                  precision=precision, gflop_per_image=gflop, params=count_params(bank),
                                  versus=rows[0] if rows else None, repeats=repeats, peak=peak))
    return rows


# ---------------------------------------------------------------- the whole ladder

def fp32_note(device: torch.device) -> str:
    """Whether fp32 matrix products may use TF32 tensor cores on this GPU (off by default in PyTorch)."""
    if device.type != "cuda":
        return ""
    return f"matmul TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"


def backbone_ladder(model: nn.Module, device: torch.device, batch_size: int, *, name: str = "", repeats: int = 10,
                    warmup: int = 2, compile: bool = True, sweep: Iterable[int] = (), peak: float | None = None,
                    compiler: Callable[[nn.Module], nn.Module] | None = None) -> list[BenchRow]:
    """fp32 eager -> half-precision autocast -> explicit attention (the price of capturing maps) -> torch.compile -> batch sizes.

    After the second step the ladder keeps the faster precision, and compares later steps with that row.
    """
    images = random_images(model, batch_size, device)
    common = dict(name=name, repeats=repeats, warmup=warmup, peak=peak)
    with fused_attention(model, True):
        fp32 = measure_forward("fp32 eager", model, images, "fp32", note=fp32_note(device), **common)
        half = half_precision(device)
        low = measure_forward(f"{half} autocast", model, images, half, versus=fp32, **common)
    base = low if low.speedup and low.speedup > 1 else fp32
    fast = base.precision
    with fused_attention(model, False):
        explicit = measure_forward(f"{fast} explicit attention", model, images, fast, versus=base,
                                   note="attention maps materialised, as when capturing them", **common)
    rows = [fp32, low, explicit]
    best, best_model = base, model
    if compile:
        with fused_attention(model, True):
            compiled_row, compiled = measure_compiled(f"{fast} compiled", model, images, fast, versus=base,
                                                      compiler=compiler, **common)
        rows.append(compiled_row)
        if compiled is not None and compiled_row.images_per_s > base.images_per_s:
            best, best_model = compiled_row, compiled
    images = None
    free_memory(device)
    sizes = list(sweep)
    if sizes:
        with fused_attention(model, True):
            rows += sweep_batch_sizes(best_model, sizes, device, fast, name=name, step=f"{best.step}, batch",
                                      repeats=max(3, repeats // 2), warmup=warmup, peak=peak, versus=best)
    return rows


@dataclass(frozen=True)
class LadderSizes:
    """How much chapter 07 times: images per call, calls per step, the sweep, probe batches and epochs, compilation."""

    batch: int
    repeats: int
    warmup: int
    sweep: tuple[int, ...]
    probe_steps: int
    probe_repeats: int
    compiled_sweep: bool  # the sweep reuses the compiled model, compiling again for each new batch size
    skip_compile: str = ""  # why the compile step is left out ("" compiles)
    quick: bool = False


#: The tiny scale's sizes, the full ladder (a GPU without an image cap), and the quick rehearsal at full scale.
TINY_SIZES = LadderSizes(64, 5, 2, (8, 32, 128), 4, 3, compiled_sweep=False)
FULL_SIZES = LadderSizes(512, 20, 2, (64, 128, 256, 512, 1024, 2048), 10, 3, compiled_sweep=True)
QUICK_SIZES = LadderSizes(2, 3, 1, (1, 2), 2, 2, compiled_sweep=False, skip_compile="quick rehearsal", quick=True)


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


def run_ladder(model_name: str, device: str | torch.device | None = None, batch_size: int = 64, steps: int = 10, *,
               compile: bool = True, sweep: Iterable[int] = (), probe: bool = True, probe_steps: int | None = None,
               peak: float | None = None) -> list[BenchRow]:
    """The whole chapter-07 ladder for a backbone name (weights are not needed: random ones time the same)."""
    from .models import load_backbone

    dev = resolve_device(device)
    if batch_size < 1 or steps < 1:
        raise SelaggError(f"Batch size and steps must be positive integers, got batch_size={batch_size}, steps={steps}.")
    model = load_backbone(model_name, pretrained=False, device=dev)
    rows = backbone_ladder(model, dev, batch_size, name=model_name, repeats=steps, compile=compile, sweep=sweep, peak=peak)
    if probe:
        data = probe_data(model, batch_size, probe_steps or max(2, steps // 2), dev)
        rows += probe_ladder(model, data, fastest_precision(rows), name=model_name, repeats=3, peak=peak)
    return rows


# ---------------------------------------------------------------- tables, files and figures

TABLE_COLUMNS = (("step", "step", "{}"), ("batch", "batch_size", "{}"), ("prec", "precision", "{}"),
                 ("median ms", "median_ms", "{:.1f}"), ("iqr ms", "iqr_ms", "{:.1f}"), ("img/s", "images_per_s", "{:,.0f}"),
                 ("GFLOP/img", "gflop_per_image", "{:.3g}"), ("TFLOP/s", "tflops", "{:.3g}"),
                 ("% peak", "pct_of_peak", "{:.1f}"), ("MB", "memory_mb", "{:,.0f}"), ("params", "params", "{:,}"),
                 ("speed-up", "speedup", "{:.2f}x"), ("vs", "versus", "{}"), ("status", "status", "{}"))


def table_cells(rows: list[BenchRow]) -> tuple[list[str], list[list[str]]]:
    """The column titles and the formatted cells of the rows ("-" where a row has no value)."""
    cells = []
    for row in rows:
        values = []
        for _, attr, fmt in TABLE_COLUMNS:
            value = getattr(row, attr)
            values.append("-" if value is None or value == "" else fmt.format(value))
        cells.append(values)
    return [title for title, _, _ in TABLE_COLUMNS], cells


def table_notes(rows: list[BenchRow]) -> list[str]:
    """The lines printed under a table: the device, what the memory column measures, each row's note."""
    footer = sorted({f"device: {r.device}" for r in rows} | {f"MB: {r.memory_kind}" for r in rows if r.memory_kind})
    footer.append("median ms: per call of the step (one batch, or one whole epoch for epoch rows)")
    return footer + [f"{r.step}: {r.note}" for r in rows if r.note]


def format_table(rows: list[BenchRow]) -> str:
    """The rows as an aligned text table, with the device and what the memory column measures underneath."""
    header, cells = table_cells(rows)
    cells = [header, *cells]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) if i in (0, 2, 12, 13) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines + table_notes(rows))


# Columns that describe the setting rather than the measurement: when every row shares the value,
# a notebook shows it once under the table, so that the table fits the page.
SHARED_COLUMNS = ("batch", "prec", "GFLOP/img", "params")


def show(rows: list[BenchRow]) -> None:
    """Show the rows as a table: HTML in a notebook (columns without a value, a status all "ok", or a
    setting every row shares, left out of the table and named under it), aligned text elsewhere."""
    try:
        from IPython import get_ipython
    except ImportError:
        get_ipython = None
    if get_ipython is None or get_ipython() is None:
        print(format_table(rows))
        return
    from .viz import Table, show_table

    header, cells = table_cells(rows)
    same = [i for i in range(len(header)) if header[i] in SHARED_COLUMNS and len(cells) > 1
            and len({row[i] for row in cells}) == 1]
    kept = [i for i in range(len(header)) if any(row[i] != "-" for row in cells) and i not in same
            and not (header[i] == "status" and all(row[i] == "ok" for row in cells))]
    show_table(Table([header[i] for i in kept], [[row[i] for i in kept] for row in cells]))
    shared = [f"{header[i]} {cells[0][i]}" for i in same if cells[0][i] != "-"]
    print("\n".join(([f"every row: {', '.join(shared)}"] if shared else []) + table_notes(rows)))


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


def plot_rows(rows: list[BenchRow], ax=None, title: str | None = None, log: bool = False):
    """A horizontal bar chart of images/s per step (skipped and out-of-memory steps shown empty), optionally on a log axis."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    labels = [r.step if r.ok else f"{r.step} ({r.status[:40]})" for r in rows]
    values = [r.images_per_s or 0.0 for r in rows]
    bars = ax.barh(range(len(rows)), values, color=["tab:blue" if r.ok else "lightgray" for r in rows])
    for bar, r in zip(bars, rows):
        if r.ok and r.pct_of_peak:
            ax.annotate(f" {r.pct_of_peak:.0f}% of peak", (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                        va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    ax.set_xlabel("images per second (higher is better)" + (", log scale" if log else ""))
    ax.set_title(title or (f"{rows[0].model} on {rows[0].device}" if rows else ""))
    ax.figure.tight_layout()
    return ax
