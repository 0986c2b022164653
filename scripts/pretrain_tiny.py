"""Pretrain the book's tiny backbones on cluttered digits and write checkpoints with manifests.

    python scripts/pretrain_tiny.py --method mae --steps 2400
    python scripts/pretrain_tiny.py --method jea --steps 600
    python scripts/pretrain_tiny.py --method random

Each run writes selagg_utils/checkpoints/tiny-<method>.safetensors and its .json manifest.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selagg_utils.checks import SelaggError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("mae", "jea", "random"), required=True)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 2400 MAE, 600 JEA)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1.5e-3 MAE, 1e-3 JEA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the package's checkpoints)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from selagg_utils.weights.training import method_options, pretrain_tiny

        options = replace(method_options(args.method, args.device), seed=args.seed)
        options = options if args.lr is None else replace(options, lr=args.lr)
        manifest = pretrain_tiny(args.method, steps=args.steps, batch_size=args.batch_size, options=options,
                                 threads=args.threads, out_dir=args.out)
    except SelaggError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {manifest['weights']}: final loss {manifest['final_loss']}, "
          f"{manifest['wall_time_s']:.0f} s on {manifest['device']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
