"""Extract a split's frozen tokens into a sharded token store, with one process or many under torchrun.

    python scripts/extract_tokens.py --backbone tiny-mae --dataset cluttered-digits --split train --out /tmp/store
    torchrun --nproc_per_node=2 scripts/extract_tokens.py --backbone tiny-mae --dataset cluttered-digits \\
        --split train --out /tmp/store --max-images 2000 --shard-size 256 --backend gloo
    torchrun --nproc_per_node=8 scripts/extract_tokens.py --backbone vit_base_patch16_224 \\
        --dataset imagefolder:/data/imagenet --split train --out /data/stores/vitb-train --dtype int8

Rank r extracts the shards r, r + N, ... that are missing (see `selagg_utils.scaleout.shards`); a rerun into the
same folder skips the complete, verified shards, with any number of processes. Rank 0 prints one
line: images in the store, images extracted now, seconds, images per second, bytes on disk.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selagg_utils.checks import SelaggError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", required=True, help="any name models.load_backbone accepts, e.g. tiny-mae")
    parser.add_argument("--dataset", required=True, help="a data.load_dataset name, e.g. cluttered-digits, "
                                                         "imagenette, imagefolder:<path>")
    parser.add_argument("--split", required=True, help="train, val or test")
    parser.add_argument("--out", required=True, type=Path, help="the store's folder (created; resumed if present)")
    parser.add_argument("--block", type=int, default=None, help="tokens after this block (default: the last block "
                                                                "after the final norm)")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard file")
    parser.add_argument("--dtype", choices=("float16", "int8"), default="float16")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-images", type=int, default=None, help="at most this many images of the split")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                        help="process-group backend (default: nccl with GPUs, else gloo)")
    parser.add_argument("--report", type=Path, default=None, help="also write the summary as JSON to this file")
    return parser.parse_args(argv)


def split_dataset(backbone: str, name: str, split: str, max_images: int | None):
    """The split as the backbone expects its images, cut to max_images where given."""
    from selagg_utils.data import REGISTRY, load_dataset
    from selagg_utils.models import data_config

    source = REGISTRY.get(str(name).partition(":")[0])
    options = source.options if source is not None else ()
    kwargs = {}
    if max_images is not None:
        kwargs["n_images" if "n_images" in options else "max_images"] = max_images
    config = data_config(backbone)
    if config is not None and "data_config" in options:
        kwargs["data_config"] = config
    return load_dataset(name, split, **kwargs)


def summary_line(n_store: int, n_now: int, seconds: float, n_bytes: int, world_size: int, out: Path) -> str:
    """The one line rank 0 prints."""
    from selagg_utils.cache.keys import size_text

    rate = n_now / seconds if seconds > 0 else float("nan")
    return (f"extract_tokens: {n_store} images in the store, {n_now} extracted now by {world_size} process"
            f"{'es' if world_size > 1 else ''} in {seconds:.1f} s ({rate:.1f} images/s), {size_text(n_bytes)} "
            f"on disk in {out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from selagg_utils.extraction import ExtractOptions
        from selagg_utils.scaleout.distributed import process_group
        from selagg_utils.scaleout.shard_files import StoreOptions
        from selagg_utils.scaleout.shards import extract_to_store

        if args.report is not None:  # checked before the work, so that a bad path loses nothing
            from selagg_utils.cache.keys import writable_folder

            if args.report.is_dir():
                raise SelaggError(f"--report {args.report} is a folder; give the path of a JSON file.")
            writable_folder(args.report.parent, "report", "pass --report under a folder you can write")
        with process_group(args.backend) as info:
            dataset = split_dataset(args.backbone, args.dataset, args.split, args.max_images)
            start = time.perf_counter()
            store = extract_to_store(args.backbone, dataset, args.out, block=args.block,
                                     store=StoreOptions(args.shard_size, args.dtype, args.split),
                                     options=ExtractOptions(args.batch_size, info.device))
            seconds = time.perf_counter() - start
            if info.is_main:
                n_now = sum(store.shards[i]["stop"] - store.shards[i]["start"] for i in store.extracted)
                print(summary_line(len(store), n_now, seconds, store.nbytes(), info.world_size, args.out), flush=True)
                if args.report is not None:
                    args.report.write_text(json.dumps({"images": len(store), "extracted": n_now, "seconds": seconds,
                                                       "processes": info.world_size, "bytes": store.nbytes(),
                                                       "shards_extracted": list(store.extracted)}) + "\n")
    except SelaggError as err:
        print(f"SelaggError: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
