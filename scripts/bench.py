"""Run chapter 07's benchmark ladder from the command line: print the table and write a CSV.

    python scripts/bench.py                                   # tiny backbone on this machine's device
    python scripts/bench.py --device cpu --model tiny-mae --batch-size 64 --steps 10
    python scripts/bench.py --device cuda --model vit_base_patch16_224.mae --batch-size 512 \\
        --csv benchmarks/vit_base_patch16_224.mae__h100.csv   # the full-scale reference run

Weights are not loaded (random weights time the same), so no network is needed. The CSV holds
one row per step, with the device named in every row.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selagg_utils.checks import SelaggError

DEFAULT_SWEEP = {"cuda": "64,128,256,512,1024,2048", "cpu": "16,64,256", "mps": "16,64,256"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if available)")
    parser.add_argument("--model", default="tiny-random", help="a tiny name or a timm ViT name (default: tiny-random)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward call (default: 64)")
    parser.add_argument("--steps", type=int, default=10, help="timed repeats per step, after warm-up (default: 10)")
    parser.add_argument("--sweep", default=None, help="comma-separated batch sizes for the sweep, '' for none "
                                                      "(default: 64..2048 on cuda, 16,64,256 elsewhere)")
    parser.add_argument("--probe-steps", type=int, default=None, help="batches per probe epoch (default: steps // 2)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile step")
    parser.add_argument("--no-probe", action="store_true", help="skip the probe side of the ladder")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not in the table")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--csv", type=Path, default=None, help="where to write the CSV (default: bench_<model>_<device>.csv)")
    return parser.parse_args(argv)


def sweep_sizes(text: str) -> list[int]:
    """Batch sizes from '64,128,256' (an empty string gives none)."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SelaggError(f"--sweep must be comma-separated integers such as 64,128,256, got {text!r}.") from None


def slug(text: str) -> str:
    """A file-name-safe version of a model or device name."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch

        from selagg_utils import config
        from selagg_utils.bench import hardware, ladder
        from selagg_utils.bench import report as bench_report

        if args.threads:
            torch.set_num_threads(args.threads)
        device = config.resolve_device(args.device)
        sizes = sweep_sizes(args.sweep if args.sweep is not None else DEFAULT_SWEEP.get(device.type, ""))
        sizes = ladder.LadderSizes(batch=args.batch_size, repeats=args.steps, sweep=tuple(sizes),
                                  probe_steps=args.probe_steps or max(2, args.steps // 2),
                                  skip_compile="--no-compile was given" if args.no_compile else "")
        rows = ladder.run_ladder(args.model, device, sizes, probe=not args.no_probe, peak=args.peak_tflops)
    except SelaggError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    bench_report.show(rows)
    path = args.csv or Path(f"bench_{slug(args.model)}_{slug(hardware.device_name(device))}.csv")
    print(f"wrote {ladder.write_csv(rows, path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
