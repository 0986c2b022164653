"""What extraction costs in memory: peak RSS of filling the feature cache, by number of images.

    python scripts/bench_extract_memory.py                          # 500 and 2,000 images, batches of 32
    python scripts/bench_extract_memory.py --images 500,2000 --batch-size 32 --old-images 500,2000

For each size, a generated Imagenette stand-in (`rehearsal.fake_imagenette`, 10 classes) is written,
and `features.cached_tokens` extracts the train split of `imagenette.folders.image_folder` with timm's
`vit_base_patch16_224` (random weights, nothing downloaded: 197 tokens of width 768, float16) into a
temporary cache. Every measurement runs in a fresh Python process, so that no two share a high-water
mark: peak RSS is that process's `ru_maxrss`. Peak anonymous RSS (memory the kernel cannot drop) is
sampled every 20 ms from /proc/self/status; the rest of RSS is file pages (mapped entry pages), which
the kernel reclaims under pressure. Measured: the backbone loaded and nothing else (the fixed part),
the extraction, and a later load of the entry with `mean_patches`; with --old-images, the approach
before streaming too (every batch kept in memory, concatenated, then saved with safetensors'
save_file). The figures are printed, not asserted; the extrapolation assumes what the measurements
show, that peak RSS of an extraction does not grow with the number of images.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BACKBONE = "random:vit_base_patch16_224"
TOKENS, WIDTH = 197, 768
#: Images per split of the real datasets, for the extrapolation: (train, val).
SPLITS = {"Imagenette (160 px)": (9_469, 3_925), "ImageNet-1k": (1_281_167, 50_000)}
COLAB_RAM = 12.7e9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="500,2000", help="generated images per run, comma-separated")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--old-images", default="500,2000", help="sizes also measured with the in-memory approach "
                                                                 "('' for none)")
    parser.add_argument("--directory", default=None, help="where images and caches go (default: a temporary folder)")
    parser.add_argument("--child", choices=["baseline", "extract", "load", "old"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- inside a fresh process
class AnonPeak:
    """The largest RssAnon of this process, sampled on a thread every 20 ms."""

    def __init__(self) -> None:
        self.peak, self.running = anon_rss(), True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, anon_rss())
            time.sleep(0.02)

    def stop(self) -> int:
        """Stop sampling and return the peak in bytes."""
        self.running = False
        self.thread.join()
        return max(self.peak, anon_rss())


def anon_rss() -> int:
    """This process's anonymous resident memory in bytes (0 where /proc is missing)."""
    from selagg_utils.bench.timing import status_kib

    return (status_kib("RssAnon") or 0) * 1024


def old_extraction(dataset, batch_size: int, path: Path) -> None:
    """The approach before streaming: every batch's tokens in memory, concatenated, then saved whole."""
    from safetensors.torch import save_file

    from selagg_utils import extraction
    from selagg_utils.models import load_backbone

    tokens, labels = extraction.extract_blocks(load_backbone(BACKBONE), dataset, [None],
                                               extraction.ExtractOptions(batch_size, progress=False))
    save_file({"tokens": tokens[0].contiguous(), "labels": labels}, str(path), metadata={"approach": "old"})


def child(args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process: what it did, its wall time, peak RSS and peak anonymous RSS."""
    import torch

    from selagg_utils import extraction, features
    from selagg_utils.cache import entries as cache_entries
    from selagg_utils.bench.timing import lifetime_peak_rss_bytes, seconds
    from selagg_utils.cache import keys as cache_keys
    from selagg_utils.imagenette.folders import image_folder
    from selagg_utils.models import load_backbone

    dataset = image_folder(Path(args.root) / "imagenette2-160", "train")
    out = {"images": len(dataset)}

    def run() -> None:
        if args.child == "baseline":
            load_backbone(BACKBONE)
        elif args.child == "extract":
            quiet = extraction.ExtractOptions(batch_size=args.batch_size, progress=False)
            entry = features.cached_tokens(BACKBONE, dataset, options=quiet, directory=args.cache)
            out["entry_bytes"] = cache_keys.entry_path(entry.key, args.cache).stat().st_size
        elif args.child == "load":
            extract = extraction.extract_blocks
            cache_entries.extract_blocks = lambda *a, **k: sys.exit("the entry was not in the cache")
            entry = features.cached_tokens(BACKBONE, dataset, options=extraction.ExtractOptions(progress=False),
                                           directory=args.cache)
            cache_entries.extract_blocks = extract
            mean = entry.mean_patches
            out["mean_finite"] = bool(torch.isfinite(mean).all())
        else:
            path = Path(args.cache) / "old.safetensors"
            old_extraction(dataset, args.batch_size, path)
            out["entry_bytes"] = path.stat().st_size

    sampler = AnonPeak()
    out["seconds"] = seconds(run, "cpu")
    out.update(peak_rss=lifetime_peak_rss_bytes(), peak_anon=sampler.stop())
    return out


# ----------------------------------------------------------------------------- the driver
def measured(kind: str, root: Path, cache: Path, batch_size: int) -> dict:
    """Run one measurement in a fresh process and return what it printed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--child", kind, "--root", str(root), "--cache", str(cache),
           "--batch-size", str(batch_size)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"The {kind} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def generated_images(folder: Path, n_images: int) -> Path:
    """A generated Imagenette stand-in of n_images training images (10 classes), one val image per class."""
    from selagg_utils.scaleout.rehearsal import fake_imagenette

    return fake_imagenette(folder / f"images-{n_images}", train_per_class=n_images // 10, val_per_class=1)


def gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.2f} GB"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    import torch

    sizes = [int(n) for n in args.images.split(",") if n.strip()]
    old_sizes = {int(n) for n in args.old_images.split(",") if n.strip()}
    folder = Path(args.directory or tempfile.mkdtemp(prefix="bench-extract-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, backbone "
          f"{BACKBONE}, batch size {args.batch_size}; one fresh process per row; images: the train split "
          "(90 % of the generated images)")
    runs, rows = {}, []
    for n in sizes:
        root = generated_images(folder, n)
        cache = folder / f"cache-{n}"
        if n == sizes[0]:
            runs["baseline"] = measured("baseline", root, cache, args.batch_size)
        runs[n] = {kind: measured(kind, root, cache, args.batch_size) for kind in ("extract", "load")}
        if n in old_sizes:
            runs[n]["old"] = measured("old", root, cache, args.batch_size)
        shutil.rmtree(cache)
        for kind, name in (("extract", "streamed extraction"), ("load", "load + mean_patches"),
                           ("old", "old: in memory, then save_file")):
            r = runs[n].get(kind)
            if r is None:
                continue
            rows.append([f"{r['images']:,}", name, gb(r["peak_rss"]), gb(r["peak_anon"]), f"{r['seconds']:.1f} s",
                         f"{r['images'] / r['seconds']:.1f}" if kind != "load" else "",
                         gb(r["entry_bytes"]) if "entry_bytes" in r else ""])
    base = runs["baseline"]
    print(table(["images", "run", "peak RSS", "peak anon RSS", "wall", "images/s", "entry on disk"], rows))
    print(f"Fixed part: Python, torch and the backbone loaded, nothing extracted: peak RSS {gb(base['peak_rss'])}.")
    first, last = runs[sizes[0]]["extract"], runs[sizes[-1]]["extract"]
    ratio = last["peak_rss"] / first["peak_rss"]
    print(f"Peak RSS of the extraction, {last['images']:,} vs {first['images']:,} images: {ratio:.3f} "
          f"({'within' if abs(ratio - 1) <= 0.10 else 'NOT within'} the 10 % target).")
    olds = [runs[n]["old"] for n in sizes if "old" in runs[n]]
    for old in olds:
        print(f"At {old['images']:,} images the old approach peaked at {gb(old['peak_rss'])} (its tokens: "
              f"{gb(old['entry_bytes'])}).")
    old_factor = None
    if len(olds) >= 2:  # the growth of the old peak per byte of tokens, between the smallest and largest run
        old_factor = (olds[-1]["peak_rss"] - olds[0]["peak_rss"]) / (olds[-1]["entry_bytes"] - olds[0]["entry_bytes"])
        print(f"The old approach's peak grew by {old_factor:.2f} bytes per byte of tokens; the streamed one's by "
              f"{growth(runs, sizes):.3f}.")
    print(extrapolation(runs, sizes, old_factor))
    print(f"A free Colab runtime has {gb(COLAB_RAM)} of RAM. File pages of a mapped entry are counted in RSS but "
          "are reclaimable: under pressure the kernel drops them (and reads them again when used) instead of failing.")


def growth(runs: dict, sizes: list[int]) -> float:
    """How much the streamed extraction's peak RSS grew per byte of tokens, between the smallest and largest run."""
    first, last = runs[sizes[0]]["extract"], runs[sizes[-1]]["extract"]
    return (last["peak_rss"] - first["peak_rss"]) / max(1, last["entry_bytes"] - first["entry_bytes"])


def extrapolation(runs: dict, sizes: list[int], old_factor: float | None) -> str:
    """Disk and memory per backbone at the sizes of Imagenette and ImageNet-1k, from the measured runs."""
    per_image = TOKENS * WIDTH * 2 + 8  # float16 tokens and an int64 label
    extraction_peak = max(runs[n]["extract"]["peak_rss"] for n in sizes)
    load = runs[sizes[-1]]["load"]
    load_fixed = load["peak_anon"] - load["images"] * WIDTH * 4  # less the float32 (N, 768) mean it returned
    rows = []
    old_run = next((runs[n]["old"] for n in sizes if "old" in runs[n]), None)
    for name, (train, val) in SPLITS.items():
        old = "not measured"
        if old_factor is not None:
            old = gb(old_run["peak_rss"] + old_factor * (train * per_image - old_run["entry_bytes"]))
        rows.append([name, f"{train:,} + {val:,}", gb((train + val) * per_image), gb(extraction_peak), old,
                     f"{gb(load_fixed + train * WIDTH * 4)} + {gb(train * per_image)} of file pages"])
    header = ["dataset", "train + val images", "tokens on disk", "extraction peak RSS", "old approach, train split",
              "load train split + mean_patches: anon + file pages"]
    return ("Extrapolation per backbone (last block, 197 x 768 float16 tokens an image; peak RSS of a streamed "
            "extraction does not depend on the number of images):\n" + table(header, rows))


if __name__ == "__main__":
    main()
