"""The arithmetic of scaling out: backbone passes, FLOPs and token bytes, and wall times of a whole probe grid.

Every function takes its inputs as arguments (sizes, counted FLOPs, measured or assumed rates) and
returns a number or a table row, so that a chapter can show where each figure comes from.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checks import SelaggError

__all__ = ["IMAGENET_TRAIN_IMAGES", "IMAGENET_VAL_IMAGES", "vit_forward_flops", "token_bytes",
           "pooled_bytes", "probe_runs", "backbone_passes", "head_train_flops", "GpuAssumptions",
           "assumed_gpu_rates", "rates_at", "GridPlan", "probe_bound", "grid_seconds", "reference_seconds",
           "duration_text", "run_script", "results_agree", "stores_equal"]

IMAGENET_TRAIN_IMAGES = 1_281_167  # ImageNet-1k's train split
IMAGENET_VAL_IMAGES = 50_000       # and its val split
#: Bytes of one stored value; an int8 store also keeps one float16 scale per token (SCALE_BYTES).
VALUE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
SCALE_BYTES = 2


# ----------------------------------------------------------------------------- counting
def vit_forward_flops(depth: int, dim: int, tokens: int, patch_values: int) -> int:
    """FLOPs of one image through a ViT with one [cls] token and MLP ratio 4 (a multiply-add counts 2)."""
    per_block = tokens * 12 * dim ** 2 + 2 * tokens ** 2 * dim
    return 2 * (depth * per_block + (tokens - 1) * dim * patch_values)


def token_bytes(n_images: int, n_tokens: int, width: int, dtype: str = "float16", blocks: int = 1) -> int:
    """Bytes of a token store: every token of every image, for `blocks` blocks (int8: plus a float16 scale per token)."""
    if dtype not in VALUE_BYTES:
        raise SelaggError(f"Unknown token dtype {dtype!r}; choose one of {', '.join(VALUE_BYTES)}.")
    per_token = width * VALUE_BYTES[dtype] + (SCALE_BYTES if dtype == "int8" else 0)
    return n_images * n_tokens * per_token * blocks


def pooled_bytes(n_images: int, width: int) -> int:
    """Bytes of one float32 feature per image: what a [cls] or mean probe reads per epoch once its features are pooled."""
    return n_images * width * 4


def probe_runs(heads: int, lrs: int, seeds: int) -> int:
    """Probe runs of a grid: one per head, learning rate and seed."""
    return heads * lrs * seeds


def backbone_passes(runs: int, epochs: int, cached: bool) -> int:
    """Passes of the frozen backbone over the train split: one per epoch of every run, or one in all from a cache."""
    return 1 if cached else runs * epochs


def head_train_flops(head_name: str, n_tokens: int, width: int, num_classes: int, grid_size: tuple[int, int],
                     batch: int = 4) -> float:
    """FLOPs per image of one training step of one probe head (forward and backward), counted with FlopCounterMode.

    The package's head on random tokens of this shape ([cls] first); only matrix products are counted.
    """
    from ..bench.timing import count_flops
    from ..features import TokenSet
    from ..models import TokenLayout
    from ..probing import probe_head

    tokens = TokenSet(torch.zeros(batch, n_tokens, width, dtype=torch.float16), torch.arange(batch) % num_classes,
                      TokenLayout(True, n_tokens - 1 - grid_size[0] * grid_size[1], grid_size))
    head = probe_head(head_name, tokens, num_classes).train()
    x = torch.randn(batch, n_tokens, width)

    def step():
        F.cross_entropy(head(x), tokens.labels).backward()

    return count_flops(step) / batch


# ----------------------------------------------------------------------------- rates
@dataclass(frozen=True)
class GpuAssumptions:
    """One data-centre GPU as the estimate assumes it (datasheet figures, and an assumed share of the peak reached)."""

    name: str = "H100 SXM"
    peak_tflops: float = 989.0       # dense bf16 tensor-core peak (datasheet)
    utilisation: float = 0.4         # assumed share of that peak reached by the backbone and the heads
    memory_gb: float = 80.0          # HBM capacity (datasheet)
    hbm_gb_s: float = 3350.0         # HBM bandwidth (datasheet)
    host_gb_s: float = 64.0          # PCIe Gen5 x16, one direction (the datasheet's 128 GB/s counts both)
    step_ms: float = 2.0             # assumed fixed cost of one optimizer step of a stacked grid (launches, Python)


@dataclass(frozen=True)
class DeviceRates:
    """What one device does at ViT-B/16 scale: backbone images/s, and per head the FLOP/s and bytes/s of probe training."""

    name: str
    images_per_s: float
    probe_flop_s: dict[str, float]
    probe_bytes_s: dict[str, float] = field(default_factory=dict)  # none given: reading is not the bound
    step_s: float = 0.0              # fixed cost of one optimizer step (0: already inside the measured FLOP/s)


def assumed_gpu_rates(gpu: GpuAssumptions, gflop_per_image: float, heads: tuple[str, ...],
                      store_gb_per_device: float) -> DeviceRates:
    """Rates of `gpu` from its assumptions: tokens read from HBM where the device's share of the store fits, else over PCIe."""
    flop_s = gpu.peak_tflops * 1e12 * gpu.utilisation
    read = gpu.hbm_gb_s if store_gb_per_device <= gpu.memory_gb else gpu.host_gb_s
    return DeviceRates(gpu.name, flop_s / (gflop_per_image * 1e9), {h: flop_s for h in heads},
                       {h: read * 1e9 for h in heads}, gpu.step_ms / 1e3)


def rates_at(name: str, measured_images_per_s: float, measured_gflop_per_image: float, gflop_per_image: float,
             measured_head_flop_s: dict[str, float]) -> DeviceRates:
    """A measured device's rates carried to another backbone at the FLOP/s it reached (compute-bound: no byte bound)."""
    achieved = measured_images_per_s * measured_gflop_per_image
    return DeviceRates(name, achieved / gflop_per_image, dict(measured_head_flop_s))


# ----------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class GridPlan:
    """A probe grid: train/val images, tokens per image, width, heads with their train FLOPs per image and copy."""

    n_train: int
    n_val: int
    n_tokens: int
    width: int
    head_flops: dict[str, float]     # forward + backward FLOPs per image of one copy
    lrs: int = 8
    seeds: int = 3
    epochs: int = 90
    batch_size: int = 256
    dtype: str = "float16"

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: the global batch is the same on any number of devices."""
        return self.n_train // self.batch_size

    @property
    def copies(self) -> int:
        """Copies of each head trained together: one per learning rate and seed."""
        return self.lrs * self.seeds

    def bytes_per_epoch(self, head: str) -> int:
        """Bytes a head's stacked grid reads per epoch: the tokens once per seed (each seed draws its own batches),
        or pooled features for [cls] and mean."""
        if head in ("cls", "mean"):
            return self.seeds * pooled_bytes(self.n_train, self.width)
        return self.seeds * token_bytes(self.n_train, self.n_tokens, self.width, self.dtype)


def probe_seconds(plan: GridPlan, rates: DeviceRates, head: str, n_devices: int) -> float:
    """Seconds to train one head's whole stacked grid.

    Each epoch is bound by its FLOPs or its bytes read, both split over the devices, or by its optimizer
    steps, which data parallelism does not reduce (every device takes every step).
    """
    flop_time = plan.n_train * plan.head_flops[head] * plan.copies / rates.probe_flop_s[head]
    byte_time = plan.bytes_per_epoch(head) / rates.probe_bytes_s[head] if head in rates.probe_bytes_s else 0.0
    return plan.epochs * max(max(flop_time, byte_time) / n_devices, plan.steps_per_epoch * rates.step_s)


def probe_bound(plan: GridPlan, rates: DeviceRates, head: str, n_devices: int) -> str:
    """What bounds a head's epochs in `probe_seconds`: 'FLOPs', 'bytes read' or 'optimizer steps'."""
    flop_time = plan.n_train * plan.head_flops[head] * plan.copies / rates.probe_flop_s[head] / n_devices
    byte_time = plan.bytes_per_epoch(head) / rates.probe_bytes_s[head] / n_devices if head in rates.probe_bytes_s else 0.0
    times = {"FLOPs": flop_time, "bytes read": byte_time, "optimizer steps": plan.steps_per_epoch * rates.step_s}
    return max(times, key=times.get)


def grid_seconds(plan: GridPlan, rates: DeviceRates, n_devices: int) -> dict[str, float]:
    """Wall seconds of the cached protocol: 'extraction' (one pass over train and val), 'probes' (every head), 'total'.

    Both parts scale linearly over `n_devices` (disjoint shards of images; data-parallel probes).
    """
    extraction = (plan.n_train + plan.n_val) / (rates.images_per_s * n_devices)
    probes = sum(probe_seconds(plan, rates, h, n_devices) for h in plan.head_flops)
    return {"extraction": extraction, "probes": probes, "total": extraction + probes}


def reference_seconds(plan: GridPlan, rates: DeviceRates, n_devices: int) -> float:
    """Wall seconds of the reference protocol: every run passes the train split through the backbone every epoch.

    Only the backbone's forward passes and the same probe arithmetic are counted (no decoding, no
    augmentation), so this is a lower bound.
    """
    runs = probe_runs(len(plan.head_flops), plan.lrs, plan.seeds)
    passes = backbone_passes(runs, plan.epochs, cached=False)
    probe_flops = sum(plan.n_train * plan.head_flops[h] * plan.copies * plan.epochs / rates.probe_flop_s[h]
                      for h in plan.head_flops)
    return (passes * plan.n_train / rates.images_per_s + probe_flops) / n_devices


# ----------------------------------------------------------------------------- smaller tokens
def duration_text(seconds: float) -> str:
    """A duration in the largest unit that keeps it readable: s, min, h or days."""
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.1f} s" if seconds < 100 else f"{seconds / 60:.1f} min"


# ----------------------------------------------------------------------------- the scripts
def torchrun_command(script: str | Path, args: list[str], nproc: int = 1) -> list[str]:
    """The command line that runs a script under torchrun with `nproc` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(script), *map(str, args)]


def failure_line(stderr: str) -> str:
    """The line of a failed run's error output that says what went wrong (torchrun adds banners after it)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and set(line.strip()) - set("=-")]
    errors = [line for line in lines if "Error" in line.split(":", 1)[0]]
    return (errors or lines or ["no message"])[-1]


def run_script(script: str | Path, args: list[str], nproc: int = 1, timeout: float = 600,
               env: dict[str, str] | None = None) -> dict:
    """Run a script under torchrun; its last printed line, the wall seconds, and (if --out names a JSON file) its content."""
    import os

    start = time.perf_counter()
    done = subprocess.run(torchrun_command(script, args, nproc), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SelaggError(f"{Path(script).name} with {nproc} process{'es' if nproc > 1 else ''} failed "
                          f"(exit {done.returncode}): {failure_line(done.stderr)}")
    lines = done.stdout.strip().splitlines()
    result = {"summary": lines[-1] if lines else "", "seconds": seconds}
    if "--out" in args:
        out = Path(args[args.index("--out") + 1])
        if out.suffix == ".json":
            result["json"] = json.loads(out.read_text())
    return result


def results_agree(a, b, ignore: tuple[str, ...] = ("seconds",), tol: float = 1e-6) -> bool:
    """Whether two results (JSON-like: dicts, lists, numbers, text) agree, numbers within `tol`, keys in `ignore` skipped."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) - set(ignore)
        return keys == set(b) - set(ignore) and all(results_agree(a[k], b[k], ignore, tol) for k in keys)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(results_agree(x, y, ignore, tol) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(a - b) <= tol or (a != a and b != b)
    return a == b


def stores_equal(a: str | Path, b: str | Path) -> bool:
    """Whether two token stores hold the same shards, byte for byte, and index the same shards."""
    a, b = Path(a), Path(b)
    shards = sorted(p.name for p in a.glob("shard-*.safetensors"))
    if shards != sorted(p.name for p in b.glob("shard-*.safetensors")) or not shards:
        return False
    index_a, index_b = (json.loads((p / "index.json").read_text()) for p in (a, b))
    return (index_a.get("shards") == index_b.get("shards")
            and all((a / s).read_bytes() == (b / s).read_bytes() for s in shards))
