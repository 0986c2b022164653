"""Evidence that the shipped tiny backbones learned (the table of chapter 3).

    python scripts/evaluate_tiny.py [--json out.json]

Prints k-NN and linear-probe test accuracy on [cls] and mean-pooled patches for tiny-mae,
tiny-jea and tiny-random, the MAE's reconstruction error against a mean-fill baseline, and
whether the three gates hold.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selagg_utils.data import load_dataset  # noqa: E402
from selagg_utils.pretrain import load_tiny_mae, probe_report, reconstruction_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    train = load_dataset("cluttered-digits", "train", n_images=args.n_train)
    test = load_dataset("cluttered-digits", "test", n_images=args.n_test)
    rows = {name: probe_report(name, train, test) for name in ("tiny-mae", "tiny-jea", "tiny-random")}
    recon = reconstruction_report(load_tiny_mae(), test.images)
    cols = ["knn_cls", "knn_mean", "linear_cls", "linear_mean"]
    print(f"{'model':<12}" + "".join(f"{c:>13}" for c in cols))
    for name, row in rows.items():
        print(f"{name:<12}" + "".join(f"{row[c]:>13.3f}" for c in cols))
    print(f"MAE hidden-patch MSE {recon['mae_mse']:.4f} vs mean-fill {recon['baseline_mse']:.4f} "
          f"(ratio {recon['ratio']:.3f})")
    rnd, jea, mae = rows["tiny-random"], rows["tiny-jea"], rows["tiny-mae"]
    gates = {
        "jea_cls_probe_25_points_above_random": jea["linear_cls"] - rnd["linear_cls"] >= 0.25,
        "mae_best_probe_15_points_above_random": max(mae.values()) - max(rnd.values()) >= 0.15,
        "mae_reconstruction_at_most_0.6_of_baseline": recon["ratio"] <= 0.6,
    }
    for gate, ok in gates.items():
        print(f"{'PASS' if ok else 'FAIL'}  {gate}")
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"probes": rows, "reconstruction": recon, "gates": gates}, indent=2))
    return 0 if all(gates.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
