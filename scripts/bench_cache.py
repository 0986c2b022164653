"""What verifying a feature-cache entry costs: the checksum's share of the time to load the entry.

    python scripts/bench_cache.py                         # a 5,000-image tiny entry and a 2,000-image ViT-B/16 one
    python scripts/bench_cache.py --threads 2 --repeats 7
    python scripts/bench_cache.py --extract-vit           # ViT-B/16 tokens from a real forward pass (slow on a CPU)

The tiny entry holds the tokens of `tiny-random` on 5,000 cluttered-digits images, extracted for
real. The ViT-B/16 entry has the shape of 2,000 images through `vit_base_patch16_224` (197 tokens
of width 768, float16, 0.6 GB); by default its tokens are random numbers of that shape, since the
cost of a checksum depends on the bytes, not on their values; with --extract-vit they come from
timm's `vit_base_patch16_224` (random weights, nothing downloaded) on generated images.

For each entry, the median over --repeats of (a) a load without verification: safetensors maps the
file and the tensors are copied into memory once (safetensors alone maps lazily and reads nothing
until the tensors are used, so the copy stands for that first use), (b) the checksum alone on the
loaded tensors, (c) `token_store.read_entry`, which maps the file and verifies it (its checksum pass is
the first read of the pages). The share is (b) / ((a) + (b)). The file is in the page cache after
the first pass, so (a) is the fastest a load can be and the share an upper bound: from a cold disk
it is smaller.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from selagg_utils import extraction, features
from selagg_utils.cache import entries as cache_entries
from selagg_utils.bench.timing import median_seconds
from selagg_utils.cache import store as token_store
from selagg_utils.data import load_dataset  # noqa: E402
from selagg_utils.features import TokenSet  # noqa: E402
from selagg_utils.models import TokenLayout  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (hashing uses every core)")
    parser.add_argument("--tiny-images", type=int, default=5000)
    parser.add_argument("--vit-images", type=int, default=2000)
    parser.add_argument("--extract-vit", action="store_true", help="ViT-B/16 tokens from a real forward pass")
    parser.add_argument("--directory", default=None, help="where the entries are written (default: a temporary folder)")
    return parser.parse_args(argv)


def tiny_entry(n_images: int) -> TokenSet:
    """Real tokens of tiny-random on cluttered-digits images."""
    data = load_dataset("cluttered-digits", "train", n_images=n_images, seed=0)
    return features.cached_tokens("tiny-random", data, options=extraction.ExtractOptions(progress=False),
                                  directory=tempfile.mkdtemp())


def vit_entry(n_images: int, extract: bool) -> TokenSet:
    """A ViT-B/16-shaped entry: random tokens, or tokens of timm's vit_base_patch16_224 on generated images."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (n_images,), generator=g)
    if extract:
        from selagg_utils.models import load_backbone

        model = load_backbone("vit_base_patch16_224", pretrained=False)
        images = torch.utils.data.TensorDataset(torch.rand(n_images, 3, 224, 224, generator=g), labels)
        tokens, labels = extraction.extract_blocks(model, images, [None],
                                                   extraction.ExtractOptions(batch_size=64, progress=True))
        tokens = tokens[0]
    else:
        tokens = torch.randn(n_images, 197, 768, generator=g).half()
    return TokenSet(tokens, labels, TokenLayout(True, 0, (14, 14)), {"bench": "vit_base_patch16_224", "n": n_images})


def plain_load(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an entry, read by safetensors without any check and copied into memory."""
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name).clone() for name in ("tokens", "labels")}


def measure(name: str, entry: TokenSet, folder: Path, repeats: int) -> list[str]:
    """One row: entry size, load, checksum, verified load, and the checksum's share of the verified load."""
    path = folder / f"{name}.safetensors"
    cache_entries.save_entry(path, entry)
    state, meta = token_store.read_entry(path)
    load = median_seconds(lambda: plain_load(path), "cpu", repeats)
    check = median_seconds(lambda: token_store.entry_checksum(state, meta), "cpu", repeats)
    verified = median_seconds(lambda: token_store.read_entry(path), "cpu", repeats)
    size = path.stat().st_size
    path.unlink()
    return [name, f"{len(entry):,}", f"{size / 1e9:.2f}", f"{load:.3f}", f"{check:.3f}", f"{verified:.3f}",
            f"{100 * check / (load + check):.0f}%", f"{size / 1e9 / check:.2f}"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.directory or tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    rows = [measure("tiny-random", tiny_entry(args.tiny_images), folder, args.repeats),
            measure("vit_base_patch16_224" + (" (extracted)" if args.extract_vit else " (random tokens)"),
                    vit_entry(args.vit_images, args.extract_vit), folder, args.repeats)]
    header = ["entry", "images", "GB", "(a) load s", "(b) checksum s", "(c) read_entry s", "share (b)/(a+b)",
              "checksum GB/s"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}, warm page cache")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    limit = token_store.VERIFY_EVERY_LOAD_BYTES / 2 ** 30
    print(f"Entries up to {limit:g} GiB are verified on every load; larger ones once per process and again "
          "whenever their size, mtime or inode change.")


if __name__ == "__main__":
    main()
