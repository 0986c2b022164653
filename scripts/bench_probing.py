"""Probing on cached tokens against probing online (the frozen backbone run on every step).

    python scripts/bench_probing.py                      # tiny scale, AbMILP head on tiny-mae
    python scripts/bench_probing.py --head cls --epochs 20
    python scripts/bench_probing.py --optimizer adamw --lr 0.1     # the tiny chapter's optimizer

Prints one table: seconds per epoch (median of --repeats online epochs and of --cached-repeats
cached ones, after a warm-up epoch; the two cached settings take turns epoch by epoch), speed-up
over the online epoch, and the test accuracy after --epochs epochs trained each way from the same
seed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from selagg_utils import SelaggError, config
from selagg_utils.bench.timing import seconds
from selagg_utils.data import load_dataset  # noqa: E402
from selagg_utils.extraction import ExtractOptions  # noqa: E402
from selagg_utils.features import cached_tokens  # noqa: E402
from selagg_utils.models import load_backbone, tiny_checkpoint_path  # noqa: E402
from selagg_utils.probing import ProbeRecipe, probe_accuracy, probe_head
from selagg_utils.sweep.loop import fit_stack
from selagg_utils.sweep.stacks import ProbeStack, training_source


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=None, help="default: the scale's MIM backbone (tiny-mae)")
    parser.add_argument("--head", default="abmilp")
    parser.add_argument("--n-train", type=int, default=None, help="default: the scale's train size")
    parser.add_argument("--epochs", type=int, default=10, help="epochs for the accuracy comparison")
    parser.add_argument("--repeats", type=int, default=3, help="timed online epochs (median)")
    parser.add_argument("--cached-repeats", type=int, default=15, help="timed epochs per cached setting (median)")
    parser.add_argument("--lrs", type=int, default=8, help="learning rates trained together in the sweep row")
    parser.add_argument("--lr", type=float, default=10.0, help="base lr of the single-lr runs")
    parser.add_argument("--optimizer", default="lars", choices=("lars", "adamw"), help="lars (MAE's protocol) or adamw")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--scale", default=None)
    return parser.parse_args(argv)


def epoch_seconds(settings: list[tuple], labels: torch.Tensor, repeats: int, device: torch.device) -> list[float]:
    """Median wall time of one training epoch for each (make_stack, source_for, recipe) setting.

    Settings take turns epoch by epoch (after one untimed warm-up round), so that a machine whose
    speed drifts during the run slows them all alike and the ratios between them stay fair.
    """
    times: list[list[float]] = [[] for _ in settings]
    for r in range(repeats + 1):
        for i, (make_stack, source_for, recipe) in enumerate(settings):
            stack = make_stack()
            tokens_of = source_for(stack)
            took = seconds(lambda: fit_stack(stack, tokens_of, labels, replace(recipe, epochs=1, warmup_epochs=0),
                                             seed=r), device)
            if r:
                times[i].append(took)
    return [statistics.median(t) for t in times]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    S = config.settings(args.scale)
    device = config.device()
    name = args.backbone or S.mim
    if name in ("tiny-mae",) and not tiny_checkpoint_path(name).is_file():
        print(f"note: {name} is not trained yet; using tiny-random", file=sys.stderr)
        name = "tiny-random"
    kwargs = {"n_images": args.n_train or S.n_train} if S.dataset == "cluttered-digits" else {}
    train_set = load_dataset(S.dataset, "train", **kwargs)
    test_set = load_dataset(S.dataset, "test", **({"n_images": S.n_eval} if kwargs else {}))
    entries = {}

    def load_entries() -> None:
        for split, dataset in (("train", train_set), ("test", test_set)):
            entries[split] = cached_tokens(name, dataset, options=ExtractOptions(S.batch_size, device, progress=False))

    load_s = seconds(load_entries, device)
    train, test = entries["train"], entries["test"]
    backbone = load_backbone(name, device=device)
    images = torch.stack([train_set[i][0] for i in range(len(train_set))]) if not hasattr(train_set, "images") \
        else train_set.images

    @torch.no_grad()
    def online(idx: torch.Tensor) -> torch.Tensor:
        return backbone.forward_features(images[idx].to(device)).float()

    def cached(stack: ProbeStack):
        """The batches train_probes reads: float tokens gathered from the cache (or features pooled once)."""
        return training_source(stack, train, device)

    one = ProbeRecipe(epochs=args.epochs, warmup_epochs=1, batch_size=S.batch_size, lrs=(args.lr,),
                      optimizer=args.optimizer)
    sweep = replace(one, lrs=tuple(args.lr * 3.0 ** (i - args.lrs // 2) for i in range(args.lrs)))
    num_classes = train.num_classes

    def stack_for(recipe: ProbeRecipe):
        return lambda: ProbeStack.copies(probe_head(args.head, train, num_classes, 0), len(recipe.lrs)).to(device)

    settings = [("online (backbone every step)", lambda stack: online, one),
                ("cached tokens", cached, one),
                (f"cached tokens, {args.lrs} lrs together", cached, sweep)]
    online_sec, = epoch_seconds([(stack_for(one), settings[0][1], one)], train.labels, args.repeats, device)
    cached_secs = epoch_seconds([(stack_for(recipe), source_for, recipe) for _, source_for, recipe in settings[1:]],
                                train.labels, args.cached_repeats, device)
    rows = []
    for (label, source_for, recipe), sec in zip(settings, [online_sec, *cached_secs]):
        acc = None
        if len(recipe.lrs) == 1:
            stack = stack_for(recipe)()
            fit_stack(stack, source_for(stack), train.labels, recipe, seed=0)
            stack.reading_pooled(False)
            acc = probe_accuracy(stack.heads[0].cpu(), test)
        rows.append((label, len(recipe.lrs), sec, acc))

    online_s, cached_s = rows[0][2], rows[1][2]
    print(f"backbone {name}, head {args.head}, {args.optimizer}, lr {args.lr:g}, {len(train)} train / "
          f"{len(test)} test images, batch {S.batch_size}, {torch.get_num_threads()} threads on {device}; "
          f"tokens loaded or extracted once in {load_s:.1f} s")
    print(f"| setting | lrs | s / epoch (median of {args.repeats} online, {args.cached_repeats} cached) | vs online "
          f"| vs 1 lr cached "
          f"| test acc after {args.epochs} epochs |")
    print("|---|---|---|---|---|---|")
    for label, k, sec, acc in rows:
        print(f"| {label} | {k} | {sec:.3f} | {online_s / sec:.1f}x faster | {sec / cached_s:.2f}x cost | "
              f"{'' if acc is None else f'{100 * acc:.1f} %'} |")
    gap = abs(rows[0][3] - rows[1][3]) * 100
    print(f"targets: cached >= 50x faster than online: {online_s / cached_s:.0f}x; same accuracy within 0.5 points: "
          f"{gap:.2f} points; {args.lrs} lrs <= 2x one lr: {rows[2][2] / cached_s:.2f}x")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SelaggError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
