"""What measuring attention costs: statistics streamed over the test split vs a plain forward pass.

    python scripts/bench_attention.py                      # tiny-mae, 1k and 4k test images, CPU
    python scripts/bench_attention.py --model tiny-random --sizes 1000 4000 --threads 2
    SELAGG_SCALE=full python scripts/bench_attention.py    # the full-scale MAE on a GPU

Time: median of --repeats passes over the same images, the two modes interleaved, after one
warm-up batch each; wall-clock seconds, and the ratio of process CPU time too (steadier when other
jobs share the machine). Memory: each (mode, size) runs in a fresh process; the table gives the peak
resident memory reached during the pass minus the resident memory just before it (Linux VmHWM,
reset through /proc/self/clear_refs, with glibc's mmap threshold fixed at 1 MiB so that freed
tensors leave the resident set), and on CUDA the peak of torch's allocations.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from selagg_utils import attention, config, data, models
from selagg_utils.bench.timing import peak_memory, wall_and_cpu_seconds
from selagg_utils.checks import SelaggError

MODES = ("forward", "statistics")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="backbone (default: the scale's MAE)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000], help="numbers of test images")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the scale's batch size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--device", default=None)
    parser.add_argument("--measure-memory", nargs=2, metavar=("MODE", "SIZE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def test_loader(dataset_name: str, n_images: int, batch_size: int) -> DataLoader:
    """The first n_images of the scale's test split."""
    if dataset_name == "cluttered-digits":
        dataset = data.cluttered_digits("test", n_images=n_images).with_object_masks()
    else:
        full = data.load_dataset(dataset_name, "test")
        dataset = torch.utils.data.Subset(full, range(min(n_images, len(full))))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)


@torch.inference_mode()
def plain_forward(model: torch.nn.Module, loader: DataLoader) -> None:
    """One forward pass over the loader, as feature extraction does it (fused attention, autocast on CUDA)."""
    dev = next(model.parameters()).device
    with config.autocast(dev):
        for batch in loader:
            model.forward_features(batch[0].to(dev))


def run(mode: str, model: torch.nn.Module, loader: DataLoader) -> None:
    if mode == "forward":
        plain_forward(model, loader)
    else:
        attention.attention_statistics(model, loader, progress=False)


def timings(model: torch.nn.Module, loader: DataLoader, repeats: int) -> dict[str, float]:
    """Median wall and process-CPU seconds per pass for each mode, interleaved so both see the same load."""
    dev = next(model.parameters()).device
    warm = [next(iter(loader))]
    for mode in MODES:
        run(mode, model, warm)
    times: dict[str, list[float]] = {f"{k}{m}": [] for m in MODES for k in ("", "cpu_")}
    for _ in range(repeats):
        for mode in MODES:
            wall, cpu = wall_and_cpu_seconds(lambda: run(mode, model, loader), dev)
            times[mode].append(wall)
            times[f"cpu_{mode}"].append(cpu)
    return {m: statistics.median(t) for m, t in times.items()}


def memory_growth(mode: str, model: torch.nn.Module, loader: DataLoader) -> dict[str, float]:
    """How far resident memory (and CUDA allocations) rose above their level at the start of one pass, in MiB."""
    dev = next(model.parameters()).device
    run(mode, model, [next(iter(loader))])  # warm-up: lazy initialisations are not the pass's memory
    with peak_memory("cpu") as rss, peak_memory(dev) as allocated:
        run(mode, model, loader)
    if rss.growth_mb is None:
        raise SelaggError("The resident-memory peak of a pass needs Linux's /proc/self/clear_refs; run on Linux.")
    out = {"rss_mib": rss.growth_mb}
    if dev.type == "cuda":
        out["cuda_mib"] = allocated.growth_mb
    return out


def memory_in_fresh_process(args: argparse.Namespace, mode: str, size: int) -> dict[str, float]:
    """memory_growth measured in a new interpreter, so that no earlier pass has warmed the allocator."""
    cmd = [sys.executable, __file__, "--measure-memory", mode, str(size), "--batch-size", str(args.batch_size),
           "--model", args.model] + (["--threads", str(args.threads)] if args.threads else []) + \
          (["--device", args.device] if args.device else [])
    # A fixed glibc mmap threshold: large tensors go back to the system when freed, so the peak
    # resident size follows live memory instead of the allocator's adaptive caching.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    """The results as a Markdown table."""
    cuda = "cuda_mib_statistics" in rows[0]
    head = ["images", "forward s", "statistics s", "time ratio", "CPU-time ratio", "forward peak RSS MiB",
            "statistics peak RSS MiB"]
    head += ["forward peak CUDA MiB", "statistics peak CUDA MiB"] if cuda else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["images"], f"{r['forward']:.2f}", f"{r['statistics']:.2f}", f"{r['statistics'] / r['forward']:.2f}",
                 f"{r['cpu_statistics'] / r['cpu_forward']:.2f}", f"{r['rss_mib_forward']:.1f}",
                 f"{r['rss_mib_statistics']:.1f}"]
        cells += [f"{r['cuda_mib_forward']:.1f}", f"{r['cuda_mib_statistics']:.1f}"] if cuda else []
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = config.settings()
    args.model = args.model or settings.mim
    args.batch_size = args.batch_size or settings.batch_size
    try:
        model = models.load_backbone(args.model, device=config.device(args.device))
        if args.measure_memory:
            mode, size = args.measure_memory[0], int(args.measure_memory[1])
            print(json.dumps(memory_growth(mode, model, test_loader(settings.dataset, size, args.batch_size))))
            return 0
        rows = []
        for size in args.sizes:
            row = {"images": size, **timings(model, test_loader(settings.dataset, size, args.batch_size), args.repeats)}
            for mode in MODES:
                row.update({f"{k}_{mode}": v for k, v in memory_in_fresh_process(args, mode, size).items()})
            rows.append(row)
    except SelaggError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    dev = next(model.parameters()).device
    print(f"{args.model}, batch {args.batch_size}, {config.describe(settings.scale, dev)}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
