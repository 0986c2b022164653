"""Train a probe sweep on token stores, in one process or several; rank 0 writes the results.

    torchrun --nproc_per_node=N scripts/train_probes.py --train DIR --val DIR [--test DIR] --head abmilp \
        [--epochs E] [--seeds 0 1 2] [--batch-size B] [--out results.json] [--backend gloo]

Each process reads its part of every store (shards i with i % N == rank) and the processes train
together (`selagg_utils.scaleout.ddp_probing`): the result equals one process on the whole split. Plain
`python scripts/train_probes.py ...` runs as one process. Rank 0 prints one summary line and
writes the head, the chosen learning rate, the val accuracy per learning rate and the test
accuracy of every seed, the seconds, epochs and bytes of training tokens.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selagg_utils.features import TokenSet  # noqa: E402
from selagg_utils.probing import ProbeRecipe, ProbeResult, checked_seeds  # noqa: E402
from selagg_utils.scaleout.ddp_probing import train_probes_distributed
from selagg_utils.scaleout.distributed import ProcessInfo, process_group


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True, help="token store of the training split")
    parser.add_argument("--val", type=Path, required=True, help="token store of the split that chooses the lr")
    parser.add_argument("--test", type=Path, default=None, help="token store of the split reported")
    parser.add_argument("--head", required=True, help="pooling head: cls, mean, abmilp, attentive, ...")
    parser.add_argument("--epochs", type=int, default=ProbeRecipe.epochs)
    parser.add_argument("--warmup-epochs", type=float, default=None,
                        help="default: one ninth of the epochs (MAE: 10 of 90)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--batch-size", type=int, default=ProbeRecipe.batch_size, help="global batch size")
    parser.add_argument("--lrs", type=float, nargs="+", default=None, help="base learning rates (x batch / 256)")
    parser.add_argument("--optimizer", default=ProbeRecipe.optimizer, choices=["lars", "adamw"])
    parser.add_argument("--out", type=Path, default=None, help="results JSON (written by rank 0)")
    parser.add_argument("--backend", default=None, choices=["gloo", "nccl"],
                        help="default: nccl with GPUs, else gloo")
    return parser.parse_args(argv)


def load_part(path: Path, info: ProcessInfo) -> tuple[TokenSet, torch.Tensor]:
    """This process's part of a token store and the global indices of its images."""
    from selagg_utils.scaleout.shards import TokenStore

    store = TokenStore(path)
    return store.token_set(info.rank, info.world_size), store.part_indices(info.rank, info.world_size)


def recipe_of(args: argparse.Namespace) -> ProbeRecipe:
    """The probe recipe the arguments ask for."""
    warmup = round(args.epochs / 9) if args.warmup_epochs is None else args.warmup_epochs
    lrs = ProbeRecipe.lrs if args.lrs is None else tuple(args.lrs)
    return ProbeRecipe(epochs=args.epochs, warmup_epochs=warmup, batch_size=args.batch_size, lrs=lrs,
                       optimizer=args.optimizer)


def results_row(results: list[ProbeResult], recipe: ProbeRecipe, seconds: float, train_bytes: int,
                n_train: int, processes: int) -> dict:
    """What rank 0 writes: per seed the chosen lr, val accuracy per lr and test accuracy, and the run's size."""
    return {"head": results[0].head_name, "lrs": list(recipe.lrs), "epochs": recipe.epochs,
            "batch_size": recipe.batch_size, "optimizer": recipe.optimizer, "processes": processes,
            "train_images": n_train, "train_bytes": train_bytes, "seconds": seconds,
            "seeds": [{"seed": r.seed, "best_lr": r.best_lr, "val_by_lr": r.val_by_lr, "val": r.val, "test": r.test}
                      for r in results]}


def summary_line(row: dict) -> str:
    """One line: head, chosen lrs, mean val and test accuracy, images, processes, seconds."""
    seeds = row["seeds"]
    val = sum(s["val"] for s in seeds) / len(seeds)
    tests = [s["test"] for s in seeds if s["test"] is not None]
    test = f", test {100 * sum(tests) / len(tests):.1f}%" if tests else ""
    lrs = ", ".join(f"{s['best_lr']:g}" for s in seeds)
    size = f"{row['train_bytes'] / 1e9:.2f} GB" if row["train_bytes"] >= 1e9 else f"{row['train_bytes'] / 1e6:.1f} MB"
    return (f"{row['head']}: lr {lrs}, val {100 * val:.1f}%{test} (mean over {len(seeds)} seed(s)); "
            f"{row['train_images']} training images ({size}), {row['epochs']} epochs, "
            f"{row['processes']} process(es), {row['seconds']:.1f} s")


def checked_out(out: Path | None) -> None:
    """Refuse an output path that cannot take the results, before any training (a folder, or one not writable)."""
    from selagg_utils.cache.keys import writable_folder
    from selagg_utils.checks import SelaggError

    if out is None:
        return
    if out.is_dir():
        raise SelaggError(f"--out {out} is a folder; give the path of the results file, e.g. {out / 'results.json'}.")
    writable_folder(out.parent, "results", "pass --out under a folder you can write")


def run(args: argparse.Namespace) -> dict | None:
    """Train the sweep; rank 0 writes and prints the results and returns them."""
    recipe = recipe_of(args)
    with process_group(args.backend) as info:
        train, train_indices = load_part(args.train, info)
        val = load_part(args.val, info)[0]
        test = load_part(args.test, info)[0] if args.test is not None else None
        start = time.perf_counter()
        results = train_probes_distributed(args.head, train, val, test, recipe, tuple(args.seeds),
                                           train_indices=train_indices)
        seconds = time.perf_counter() - start
        sizes = torch.tensor([len(train), train.tokens.numel() * 2], device=info.device)  # float16 bytes, as read
        if info.world_size > 1:
            torch.distributed.all_reduce(sizes)
        if not info.is_main:
            return None
        row = results_row(results, recipe, seconds, int(sizes[1]), int(sizes[0]), info.world_size)
        if args.out is not None:
            args.out.write_text(json.dumps(row, indent=2))
        print(summary_line(row), flush=True)
        return row


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 when done, 2 with the package's one sentence when an input is wrong."""
    from selagg_utils.checks import SelaggError

    args = parse_args(argv)
    try:
        checked_out(args.out)  # every process, before any work: they all stop alike
        recipe_of(args), checked_seeds(args.seeds)
        run(args)
    except SelaggError as err:
        print(f"SelaggError: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
