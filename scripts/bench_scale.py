"""Scale-out measurements: token extraction with 1 and 2 processes, reading a sharded token store, and a
probe epoch per GB of tokens with 1 and 2 processes.

    python scripts/bench_scale.py                          # tiny-mae and ViT-B/16 shapes, 1 and 2 processes
    python scripts/bench_scale.py --skip-vit --tiny-images 2000
    python scripts/bench_scale.py --processes 1 2 4 --vit-images 64

Extraction: `scripts/extract_tokens.py` under `torchrun --standalone --nproc_per_node=P` (gloo), into
a fresh store each time; the seconds are those of `shards.extract_to_store` as rank 0 measured them
(process start-up and imports left out), so images/s compares the work itself. The backbones are
`tiny-mae` on cluttered digits and `random:vit_base_patch16_224` (ViT-B/16 with seeded random weights,
nothing downloaded) at 224 px on a generated Imagenette stand-in (`rehearsal.fake_imagenette`).
On a machine with fewer free cores than processes, more processes cannot go faster.

Reading: a float16 and an int8 store of ViT-B/16 shape (197 tokens of width 768; random tokens, since
reading costs the same whatever the values) and the tiny store just extracted. For each: the whole
split through `TokenStore.token_set` (shards mapped, copied into one tensor, int8 dequantised), a
pass over the memory-mapped shards one at a time (`TokenStore.shard_arrays`, each copied once), and
`TokenStore.verify` (the sha256 of every shard, which a reading process pays once per shard). Cold:
the store's own pages are dropped from the page cache first (`posix_fadvise(DONTNEED)` on its files,
which needs no root; the host below a virtual disk may still cache them); warm: the median of
--repeats passes with the pages cached. GB/s counts stored bytes; "tokens GB/s" the float16 bytes
handed over (twice the stored bytes for int8).

Probe epochs: `ddp_probing.bench_probe_epoch` under torchrun with P processes (gloo): an AbMILP sweep
of 8 learning rates on random float16 tokens of the tiny shape (65 tokens of width 128) and of ViT-B/16
shape, the median of a few epochs; "s/GB" in the row's text is the epoch's seconds per GB of tokens
read, the number chapter 8's estimates scale.

Each section is a function returning rows of one shape (`Row`), so another measurement adds one
function and one line in `sections`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from selagg_utils.checks import SelaggError
from selagg_utils.models import TokenLayout  # noqa: E402
from selagg_utils.scaleout import shard_files
from selagg_utils.scaleout.shards import TokenStore

VIT = "random:vit_base_patch16_224"


@dataclass
class Row:
    """One measurement: section, what was measured, processes, images, seconds, rates and a ratio to a baseline."""

    section: str
    what: str
    processes: int
    images: int
    seconds: float
    images_per_s: float
    gb_per_s: float | None = None
    tokens_gb_per_s: float | None = None
    ratio: float | None = None
    versus: str = ""


# ----------------------------------------------------------------------------- extraction
@dataclass(frozen=True)
class ExtractionCase:
    """One extraction to measure: its label (also the stores' folder name), the backbone and `load_dataset` names,
    the split, how many images, and images per shard and per forward pass."""

    label: str
    backbone: str
    dataset: str
    split: str
    n_images: int
    shard_size: int
    batch_size: int


def extraction_run(case: ExtractionCase, processes: int, out: Path) -> dict:
    """The JSON report of one `extract_tokens.py` run under torchrun with `processes` processes (gloo)."""
    report = out.with_suffix(".json")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(ROOT / "scripts" / "extract_tokens.py"), "--backbone", case.backbone, "--dataset", case.dataset,
               "--split", case.split, "--out", str(out), "--max-images", str(case.n_images),
               "--shard-size", str(case.shard_size), "--batch-size", str(case.batch_size), "--backend", "gloo",
               "--report", str(report)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise SelaggError(f"The extraction with {processes} processes failed (exit {run.returncode}): "
                          f"{run.stderr.strip().splitlines()[-1] if run.stderr.strip() else 'no message'}.")
    return json.loads(report.read_text())


def extraction_rows(case: ExtractionCase, processes: list[int], work: Path) -> list[Row]:
    """Extraction images/s with each number of processes (stores in work/<label>-<processes>), and each one's ratio
    to the first."""
    rows = []
    for p in processes:
        got = extraction_run(case, p, work / f"{case.label}-{p}")
        rows.append(Row("extract", f"{case.label} ({got['images']} images, shards of {case.shard_size})", p,
                        got["extracted"], got["seconds"], got["extracted"] / got["seconds"]))
    for row in rows:
        row.ratio, row.versus = row.images_per_s / rows[0].images_per_s, f"{rows[0].processes} process"
    return rows


# ----------------------------------------------------------------------------- probe epochs
def probe_epoch_run(processes: int, images: int, num_tokens: int, dim: int) -> dict:
    """`ddp_probing.bench_probe_epoch`'s row for one AbMILP sweep under torchrun with `processes` processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(Path(__file__).resolve()), "--probe-worker", str(images), str(num_tokens), str(dim)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise SelaggError(f"The probe epoch with {processes} processes failed (exit {run.returncode}): "
                          f"{run.stderr.strip().splitlines()[-1] if run.stderr.strip() else 'no message'}.")
    return json.loads(run.stdout.strip().splitlines()[-1])


def probe_rows(images: int, num_tokens: int, dim: int, processes: list[int], label: str) -> list[Row]:
    """Seconds per probe epoch (AbMILP, 8 learning rates) and per GB of tokens, with each number of processes."""
    rows = []
    for p in processes:
        got = probe_epoch_run(p, images, num_tokens, dim)
        rows.append(Row("probe epoch", f"{label}, AbMILP x 8 lrs: {got['seconds_per_epoch_per_gb']:.1f} s/GB", p,
                        images, got["seconds_per_epoch"], images / got["seconds_per_epoch"],
                        got["train_gb"] / got["seconds_per_epoch"]))
    for row in rows:
        row.ratio, row.versus = row.images_per_s / rows[0].images_per_s, f"{rows[0].processes} process"
    return rows


def probe_worker(images: int, num_tokens: int, dim: int) -> int:
    """One process of `probe_epoch_run`: the first prints the row as JSON."""
    from selagg_utils.scaleout.ddp_probing import ProbeProblem, bench_probe_epoch
    from selagg_utils.scaleout.distributed import process_group

    with process_group("gloo") as info:
        row = bench_probe_epoch("abmilp", ProbeProblem(images=images, num_tokens=num_tokens, dim=dim))
        if info.is_main:
            print(json.dumps(row))
    return 0


# ----------------------------------------------------------------------------- reading
def synthetic_store(folder: Path, n_images: int, n_tokens: int, width: int, shard_size: int, dtype: str,
                    grid: tuple[int, int]) -> TokenStore:
    """A store of random float16 tokens of a given shape, written as extraction writes one (one process)."""
    identity = {"format": shard_files.STORE_FORMAT, "backbone": {"backbone": "random tokens for a read benchmark"},
                "dataset": {"n_images": n_images}, "split": None, "block": "last", "norm": True,
                "compute": "float32", "dtype": dtype}
    layout = TokenLayout(True, n_tokens - grid[0] * grid[1] - 1, grid)
    folder.mkdir(parents=True, exist_ok=True)
    ranges = shard_files.shard_ranges(n_images, shard_size)
    g = torch.Generator().manual_seed(0)
    for i, (a, b) in enumerate(ranges):
        tokens = torch.randn(b - a, n_tokens, width, generator=g).half()
        shard_files.write_shard(folder, i, (a, b), tokens, torch.randint(0, 10, (b - a,), generator=g), identity, layout)
    index = shard_files.index_from_sidecars(folder, identity, ranges, shard_size)
    (folder / shard_files.INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")
    return TokenStore(folder, verify=False)


def drop_cached_pages(store: TokenStore) -> bool:
    """Ask the kernel to drop the store's files from the page cache (no root needed); False where it cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in store.path.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def mapped_pass(store: TokenStore) -> None:
    """Read every shard once through its memory map (each shard's tokens copied into one reused buffer)."""
    buffer = None
    for i in range(len(store.shards)):
        tokens, _ = store.shard_arrays(i)
        if buffer is None or buffer.shape[0] < len(tokens):
            buffer = torch.empty(tokens.shape, dtype=torch.float16)
        buffer[:len(tokens)].copy_(tokens)


def stored_token_bytes(store: TokenStore) -> int:
    """Bytes of the shard files (what a reader takes from the disk)."""
    return sum(s["bytes"] for s in store.shards)


def timed(fn: Callable[[], object]) -> float:
    """Seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def read_rows(store: TokenStore, label: str, repeats: int) -> list[Row]:
    """Cold and warm GB/s of token_set and of a pass over the mapped shards; the sha256 rate of verify()."""
    passes: dict[str, Callable[[], object]] = {"token_set()": store.token_set,
                                               "mapped pass": lambda: mapped_pass(store), "verify()": store.verify}
    stored, n = stored_token_bytes(store), len(store)
    delivered = n * store.n_tokens * store.width * 2
    rows = []
    for name, fn in passes.items():
        for state in ("cold", "warm"):
            if state == "cold":
                if not drop_cached_pages(store):
                    continue
                times = [timed(fn)]
            else:
                fn()  # pages cached
                times = [timed(fn) for _ in range(repeats)]
            seconds = statistics.median(times)
            rows.append(Row("read", f"{label}: {name}, {state}", 1, n, seconds, n / seconds, stored / seconds / 1e9,
                            None if name == "verify()" else delivered / seconds / 1e9))
    base = next(r for r in rows if "token_set(), warm" in r.what)
    for row in rows:
        row.ratio, row.versus = row.gb_per_s / base.gb_per_s, "token_set(), warm"
    return rows


# ----------------------------------------------------------------------------- the table
COLUMNS = (("section", "section", "{}"), ("what", "what", "{}"), ("procs", "processes", "{}"),
           ("images", "images", "{:,}"), ("s", "seconds", "{:.2f}"), ("img/s", "images_per_s", "{:,.1f}"),
           ("GB/s", "gb_per_s", "{:.2f}"), ("tokens GB/s", "tokens_gb_per_s", "{:.2f}"),
           ("ratio", "ratio", "{:.2f}x"), ("vs", "versus", "{}"))


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Column titles and formatted cells ("-" where a row has no value)."""
    cells = [["-" if getattr(r, attr) in (None, "") else fmt.format(getattr(r, attr)) for _, attr, fmt in COLUMNS]
             for r in rows]
    return [title for title, _, _ in COLUMNS], cells


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tiny-images", type=int, default=512)
    parser.add_argument("--vit-images", type=int, default=32, help="images for the ViT-B/16 extraction (0: skip)")
    parser.add_argument("--skip-vit", action="store_true", help="no ViT-B/16 extraction or ViT-shaped read stores")
    parser.add_argument("--read-images", type=int, default=1024, help="images in the ViT-B/16-shaped read stores")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="folder for the stores (default: a temporary one)")
    parser.add_argument("--probe-images", type=int, default=512, help="images in the probe-epoch runs (0: skip)")
    parser.add_argument("--probe-worker", type=int, nargs=3, metavar=("IMAGES", "TOKENS", "WIDTH"),
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def sections(args: argparse.Namespace, work: Path) -> list[Callable[[], list[Row]]]:
    """The measurements to run, in order; each returns its rows."""
    from selagg_utils.scaleout.rehearsal import fake_imagenette

    tiny = ExtractionCase("tiny-mae", "tiny-mae", "cluttered-digits", "train", args.tiny_images, args.shard_size, 64)
    todo = [lambda: extraction_rows(tiny, args.processes, work)]
    if not args.skip_vit and args.vit_images > 0:
        per_class = -(-args.vit_images // 9) + 1  # the folder's train split keeps 90% of its images
        root = fake_imagenette(work / "fake", train_per_class=per_class, val_per_class=1)
        folder = f"imagefolder:{root / 'imagenette2-160'}"
        vit = ExtractionCase("ViT-B/16 random, 224 px", VIT, folder, "train", args.vit_images, 8, 8)
        todo.append(lambda: extraction_rows(vit, args.processes, work))
        for dtype in ("float16", "int8"):
            todo.append(lambda dtype=dtype: read_rows(
                synthetic_store(work / f"read-{dtype}", args.read_images, 197, 768, args.shard_size, dtype, (14, 14)),
                f"ViT-B/16 shape {dtype}", args.repeats))
    todo.append(lambda: read_rows(TokenStore(work / f"tiny-mae-{args.processes[0]}", verify=False),
                                  "tiny-mae float16", args.repeats))
    if args.probe_images > 0:
        todo.append(lambda: probe_rows(args.probe_images, 65, 128, args.processes, "tiny shape"))
        if not args.skip_vit:
            todo.append(lambda: probe_rows(args.probe_images, 197, 768, args.processes, "ViT-B/16 shape"))
    return todo


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe_worker:
        return probe_worker(*args.probe_worker)
    from selagg_utils.cache.keys import size_text
    from selagg_utils.viz import show_table

    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=args.work) as tmp:
            rows = []
            for section in sections(args, Path(tmp)):
                rows += section()
            stores = {p.name: TokenStore(p, verify=False).nbytes() for p in sorted(Path(tmp).iterdir())
                      if (p / shard_files.INDEX_NAME).is_file()}
    except SelaggError as err:
        print(f"SelaggError: {err}", file=sys.stderr)
        return 2
    show_table(*table(rows))
    print(f"torch threads per process: {os.environ.get('OMP_NUM_THREADS', 'default')}; cores: {os.cpu_count()}; "
          f"stores: {', '.join(f'{k} {size_text(v)}' for k, v in stores.items())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
