"""Frozen tokens: run a backbone once over a dataset and keep its output tokens, cached on disk.

A cache entry is one safetensors file holding the tokens (float16), the labels and, in its metadata,
the key that produced it and a checksum. The key holds everything that determines the tokens: the
weights actually used (a checkpoint's sha256, a timm name with its pretrained tag, random weights
with their seed, or the digest of a model passed in), the dataset's content (its recipe and split
and a digest of its tensors, a digest of its files or items, or a key the caller gives), the
transform, the block, the dtype and the precision of the forward pass (float32, or the device's half
precision under `torch.autocast`: bfloat16 where native, float16 on other CUDA GPUs). The file name
is a digest of the key.

Memory does not grow with the number of images. Extraction streams each batch's float16 tokens
straight into the file being built: the header (shapes known from the dataset's length and the
first batch) is written first with a blank checksum, every batch lands at its offset while its
bytes are hashed, and the header is rewritten in place at the end. A loaded entry maps the file
(its tensors are copy-on-write views of the page cache, nothing is read until used), and
`TokenSet.mean_patches` converts a few images at a time. `pooled_features` keeps only the [cls]
token and the mean of the patch tokens (float32, (N, D)), computed batch by batch, in a small entry
of its own.

Format 3: the tensors lie in the file in a fixed order (labels int64, then float32, then float16), the
header is padded with spaces so that they are aligned, and the checksum is the sha256 of the metadata
(without the checksum) and of each tensor's name, dtype, shape and digest, a tensor's digest being
the sha256 of the sha256 of every 32 MiB piece of its bytes (so a large entry is verified on several
cores, streaming over the file in pieces). Entries of an older format have other names (the format is
part of the key) and are extracted again, never read.

On load the checksum is verified: a truncated or changed entry is extracted again, with one line
saying so; an intact entry whose stored key differs from the request is refused with a sentence
naming the file. The folder is checked for being a writable folder with room for the entries before
any extraction. An entry is built in a temporary file (on Linux an unnamed one, `O_TMPFILE`, which
vanishes with a killed process) that gets its final name by a rename, so an extraction killed at any
moment leaves nothing a later run would load, and a named temporary file it leaves is removed by the
next run. When the disk refuses the file halfway, the tokens are kept in memory and returned, with
one line saying they were not stored. Processes filling one entry at once take turns through a lock
file beside the entry: one extracts, the others wait and then load its entry. A loaded entry maps its
file: the package replaces entries by renaming, never in place, and so should anyone else.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, Dataset

from .checkpoints import remove_orphaned_temporaries, temporary_prefix
from .checks import DIGEST_PIECE, check_finite_items, notice, tensors_digest, update_digest, whole_number
from .errors import SelaggError
from .progress import progress_bar

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent fills only repeat the work
    fcntl = None

__all__ = ["TokenSet", "PooledFeatures", "split_tokens", "cached_tokens", "cached_blocks", "pooled_features",
           "extract_tokens", "extract_blocks", "tokens_after", "cache_dir", "entry_path", "cache_key",
           "backbone_identity", "dataset_identity", "state_digest", "key_digest", "key_text", "read_entry",
           "save_entry", "entry_checksum", "file_checksum", "DamagedEntry", "CACHE_ENV", "CACHE_FORMAT",
           "VERIFY_EVERY_LOAD_BYTES"]

CACHE_ENV = "SELAGG_CACHE"
CACHE_FORMAT = 3
_REPAIR = "remove or repair it, or pass a dataset without it"
#: Build entries in unnamed temporary files (Linux `O_TMPFILE`, named at the end through /proc/self/fd)
#: where the system offers them; elsewhere in named temporary files.
UNNAMED_TEMPORARIES = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")
#: `TokenSet.mean_patches` converts this many bytes of float32 tokens at a time.
CHUNK_BYTES = 64 << 20
#: What the header and alignment of an entry may take beyond its tensors, in the disk-space check.
HEADER_ALLOWANCE = 1 << 20


@torch.inference_mode()
def extract_tokens(model: VisionTransformer, dataset: Dataset, batch_size: int = 256,
                   device: str | torch.device = "cpu", progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """All output tokens after the final norm, (N, T, D) float32 with prefix tokens first, and labels (N,)."""
    check_extraction_inputs(dataset, batch_size)
    model.eval().to(device)
    tokens, labels = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in progress_bar(loader, enabled=progress, desc="extracting tokens", leave=False):
        images, y = batch[0], batch[1]
        check_finite_items(images, "Image", sum(len(t) for t in tokens), _REPAIR)
        tokens.append(model.forward_features(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(tokens), torch.cat(labels)


def check_extraction_inputs(dataset: Dataset, batch_size: int) -> None:
    """Raise a SelaggError for an empty dataset or a batch size that is not a positive whole number."""
    whole_number(batch_size, "batch_size", 1, "pass the number of images per forward pass, e.g. 256")
    if len(dataset) == 0:
        raise SelaggError("The dataset holds no images, so there are no tokens to extract; pass a non-empty "
                          "dataset (check its split and n_images).")


def block_tokens(model: VisionTransformer, images: torch.Tensor, blocks: list[int],
                 norm: bool = True) -> list[torch.Tensor]:
    """Tokens (B, T, D) after each requested block (1 = first, depth = last), prefix tokens first."""
    depth = len(model.blocks)
    bad = [b for b in blocks if not 1 <= b <= depth]
    if bad:
        raise SelaggError(f"Block {bad[0]} does not exist; this model has blocks 1 to {depth}.")
    if blocks == [depth] and norm:
        return [model.forward_features(images)]
    out = model.forward_intermediates(images, indices=[b - 1 for b in blocks], return_prefix_tokens=True, norm=norm,
                                      output_fmt="NLC", intermediates_only=True)
    return [torch.cat([prefix, patches], dim=1) for patches, prefix in out]


def tokens_after(model: VisionTransformer, images: torch.Tensor, blocks: list[int | None],
                 norm: bool = True) -> list[torch.Tensor]:
    """Tokens after each block in `blocks` (None = last block after the final norm) from one forward pass."""
    depth = len(model.blocks)
    inner = sorted({b for b in blocks if b is not None})
    got: dict = dict(zip(inner, block_tokens(model, images, inner, norm))) if inner else {}
    if None in blocks:
        got[None] = got[depth] if norm and depth in got else model.forward_features(images)
    return [got[b] for b in blocks]


# ----------------------------------------------------------------------------- one pass over the data
def compute_precision(device: str | torch.device) -> str:
    """How the forward pass computes on a device: 'float32', or e.g. 'bfloat16 autocast' (part of the key)."""
    from .config import half_dtype

    half = half_dtype(device)
    return "float32" if half is None else f"{str(half).removeprefix('torch.')} autocast"


def loader_workers(num_workers: int | None, device: str | torch.device) -> int:
    """Loader processes: the number given, else 0 on a CPU and min(4, cores) on CUDA."""
    if num_workers is None:
        return min(4, os.cpu_count() or 1) if torch.device(device).type == "cuda" else 0
    return whole_number(num_workers, "num_workers", 0, "pass 0 to load images in this process, or the number of "
                                                       "loader processes (None chooses for the device)")


def extraction_loader(dataset: Dataset, batch_size: int, device: str | torch.device,
                      num_workers: int | None = None) -> DataLoader:
    """The dataset in order, batch by batch, with loader workers and pinned memory on CUDA."""
    cuda = torch.device(device).type == "cuda"
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=loader_workers(num_workers, device),
                      pin_memory=cuda)


@torch.inference_mode()
def token_batches(model: VisionTransformer, dataset: Dataset, blocks: list[int | None], batch_size: int = 256,
                  device: str | torch.device = "cpu", norm: bool = True, progress: bool = True,
                  dtype: torch.dtype = torch.float16,
                  num_workers: int | None = None) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """Each batch's ([tokens (B, T, D) in `dtype` on the CPU per block], labels (B,)), checked to be finite.

    The forward pass runs under `torch.autocast` with the device's half precision (none on a CPU).
    """
    from .config import half_dtype

    check_extraction_inputs(dataset, batch_size)
    model.eval().to(device)
    half = half_dtype(device)
    done = 0
    loader = extraction_loader(dataset, batch_size, device, num_workers)
    for batch in progress_bar(loader, enabled=progress, desc="extracting tokens", leave=False):
        check_finite_items(batch[0], "Image", done, _REPAIR)
        with torch.autocast(torch.device(device).type, dtype=half) if half is not None else nullcontext():
            per_block = tokens_after(model, batch[0].to(device, non_blocking=True), blocks, norm)
        kept = []
        for tokens in per_block:
            kept.append(tokens.to(dtype).cpu())
            check_finite_items(kept[-1], f"The backbone's {dtype} tokens of image", done,
                               "the backbone produced NaN or values beyond that dtype's range: check its weights, "
                               "or extract in float32")
        labels = torch.as_tensor(batch[1]).to(torch.int64)
        yield kept, labels
        done += len(labels)


def filled(sinks: list[EntrySink], batches: Iterator[list[dict[str, torch.Tensor]]]) -> list[dict[str, torch.Tensor]]:
    """Feed each batch's rows to their sinks and return what each sink holds; on any error, discard them all."""
    try:
        for rows in batches:
            for sink, part in zip(sinks, rows):
                sink.add(part)
        return [sink.result() for sink in sinks]
    except BaseException:
        for sink in sinks:
            sink.discard()
        raise


def extract_blocks(model: VisionTransformer, dataset: Dataset, blocks: list[int | None], batch_size: int = 256,
                   device: str | torch.device = "cpu", norm: bool = True, progress: bool = True,
                   dtype: torch.dtype = torch.float16, num_workers: int | None = None,
                   into: list[EntrySink] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Tokens after several blocks in one pass over the data: ([(N, T, D)] per block, labels (N,)).

    With `into` (one sink per block), each batch goes straight into that block's entry file and the
    tokens returned map the finished file; without it they are gathered in memory.
    """
    sinks = into if into is not None else [EntrySink(None, {}, len(dataset)) for _ in blocks]
    batches = token_batches(model, dataset, blocks, batch_size, device, norm, progress, dtype, num_workers)
    held = filled(sinks, ([{"labels": labels, "tokens": t} for t in tokens] for tokens, labels in batches))
    return [h["tokens"] for h in held], held[0]["labels"]


def pooled_rows(tokens: torch.Tensor, labels: torch.Tensor, num_prefix: int, has_cls: bool) -> dict[str, torch.Tensor]:
    """One batch's pooled features: [cls] (if any) and the mean of the patch tokens, float32, and labels."""
    rows = {"labels": labels, "mean": tokens[:, num_prefix:].float().mean(1)}
    if has_cls:
        rows["cls"] = tokens[:, 0].float()
    return rows


def extract_pooled(model: VisionTransformer, dataset: Dataset, block: int | None = None, batch_size: int = 256,
                   device: str | torch.device = "cpu", norm: bool = True, progress: bool = True,
                   num_workers: int | None = None, into: EntrySink | None = None) -> dict[str, torch.Tensor]:
    """[cls] ('cls', only for a model with one), mean of the patch tokens ('mean'), (N, D) float32, and 'labels'.

    Pooled from the float16 tokens batch by batch (the same numbers as `TokenSet.cls` and `.mean_patches`
    of the cached tokens), without keeping any tokens.
    """
    from .models import has_cls_token, num_prefix_tokens

    prefix, has_cls = num_prefix_tokens(model), has_cls_token(model)
    sink = into if into is not None else EntrySink(None, {}, len(dataset))
    batches = token_batches(model, dataset, [block], batch_size, device, norm, progress, torch.float16, num_workers)
    return filled([sink], ([pooled_rows(tokens[0], labels, prefix, has_cls)] for tokens, labels in batches))[0]


# ----------------------------------------------------------------------------- tokens of one split
@dataclass
class TokenSet:
    """Cached tokens of one split: tokens (N, T, D) float16 with prefix tokens first, labels (N,)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    num_prefix_tokens: int
    has_cls: bool
    grid_size: tuple[int, int]
    key: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuse tokens and a layout that disagree, which would pool or label the wrong tokens."""
        tokens, labels = self.tokens, self.labels
        if not (isinstance(tokens, torch.Tensor) and tokens.ndim == 3 and isinstance(labels, torch.Tensor)
                and labels.ndim == 1 and len(labels) == len(tokens)):
            raise SelaggError("A TokenSet needs tokens of shape (images, tokens, width) and one label per image, "
                              f"got tokens {tuple(getattr(self.tokens, 'shape', ()))} and labels "
                              f"{tuple(getattr(self.labels, 'shape', ()))}; pass what extract_blocks returns.")
        prefix = whole_number(self.num_prefix_tokens, "num_prefix_tokens", int(bool(self.has_cls)),
                              "count the [cls] and register tokens before the patches (models.num_prefix_tokens)")
        grid = tuple(self.grid_size) if isinstance(self.grid_size, (tuple, list, torch.Size)) else (self.grid_size,)
        if len(grid) != 2 or grid[0] * grid[1] != self.tokens.shape[1] - prefix:
            raise SelaggError(f"The patch grid {grid} does not hold the {self.tokens.shape[1] - prefix} "
                              f"patch tokens that follow {prefix} prefix tokens; pass the backbone's grid "
                              "(models.patch_grid(model)).")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return self.tokens.shape[-1]

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    @property
    def cls(self) -> torch.Tensor:
        """The [cls] token of every image, (N, D) float32."""
        if not self.has_cls:
            raise SelaggError("These tokens come from a model without a [cls] token; use .mean_patches instead.")
        return self.tokens[:, 0].float()

    @property
    def patches(self) -> torch.Tensor:
        """The patch tokens, (N, patches, D) float16."""
        return self.tokens[:, self.num_prefix_tokens:]

    @property
    def mean_patches(self) -> torch.Tensor:
        """The mean of the patch tokens of every image, (N, D) float32, converted a chunk of images at a time."""
        patches = self.patches
        step = images_per_chunk(patches)
        out = torch.empty(len(patches), self.dim, dtype=torch.float32)
        for i in range(0, len(patches), step):
            out[i:i + step] = patches[i:i + step].float().mean(1)
        return out

    def head_kwargs(self) -> dict:
        """What `aggregation.make_head` needs to know about these tokens."""
        return dict(dim=self.dim, num_prefix_tokens=self.num_prefix_tokens, has_cls=self.has_cls,
                    grid_size=self.grid_size)

    def subset(self, index: torch.Tensor) -> "TokenSet":
        """The same tokens restricted to some images."""
        return TokenSet(self.tokens[index], self.labels[index], self.num_prefix_tokens, self.has_cls,
                        self.grid_size, {**self.key, "subset": True})


def images_per_chunk(tokens: torch.Tensor) -> int:
    """How many images of (N, T, D) tokens fit in CHUNK_BYTES once converted to float32 (at least one)."""
    return max(1, CHUNK_BYTES // max(1, 4 * math.prod(tokens.shape[1:])))


@dataclass(frozen=True)
class PooledFeatures:
    """Pooled features of one split: [cls] (N, D) float32 (None without one), mean of the patches (N, D), labels."""

    cls: torch.Tensor | None
    mean: torch.Tensor
    labels: torch.Tensor
    key: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


# ----------------------------------------------------------------------------- where entries live
def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The feature cache folder: the argument, else $SELAGG_CACHE, else ~/.cache/selagg/features."""
    return Path(path or os.environ.get(CACHE_ENV) or "~/.cache/selagg/features").expanduser()


def writable_cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache folder, created if needed and checked to accept a new file, else a SelaggError (before any work)."""
    folder = cache_dir(path)
    if folder.exists() and not folder.is_dir():
        raise SelaggError(f"The feature cache location {folder} is a file, not a folder; move that file away or "
                          f"point {CACHE_ENV} (or directory=) to a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=temporary_prefix(folder / "write-check"), suffix=".tmp")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise SelaggError(f"The feature cache folder {folder} cannot be written ({err.strerror or err}); point "
                          f"{CACHE_ENV} (or directory=) to a folder you can write, e.g. one under /tmp.") from None
    return folder


def token_entry_bytes(n_images: int, n_tokens: int, width: int) -> int:
    """Bytes on disk of one block's entry: float16 tokens, int64 labels and room for the header."""
    return n_images * n_tokens * width * 2 + n_images * 8 + HEADER_ALLOWANCE


def pooled_entry_bytes(n_images: int, width: int, has_cls: bool) -> int:
    """Bytes on disk of a pooled entry: float32 mean (and [cls]), int64 labels and room for the header."""
    return n_images * width * 4 * (1 + int(has_cls)) + n_images * 8 + HEADER_ALLOWANCE


def token_shape(model: VisionTransformer) -> tuple[int, int]:
    """(tokens per image, width) of a timm ViT's output: patches plus prefix tokens, and embed_dim."""
    from .models import num_prefix_tokens

    return int(model.patch_embed.num_patches) + num_prefix_tokens(model), int(model.embed_dim)


def size_text(n_bytes: int) -> str:
    """A byte count for a reader: '2.9 GB', '310 MB', '12 kB'."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= size:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{n_bytes} B"


def check_disk_space(folder: Path, needed: int) -> None:
    """Raise a SelaggError (before any extraction) when the cache folder's disk has less than `needed` bytes free."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise SelaggError(f"Extracting these tokens needs {size_text(needed)} in the feature cache {folder}, but "
                          f"only {size_text(free)} is free there; point {CACHE_ENV} (or directory=) to a disk with "
                          "more room, or set SELAGG_MAX_IMAGES to fewer images per split.")


# ----------------------------------------------------------------------------- what identifies an entry
def state_digest(model: torch.nn.Module) -> str:
    """Hex sha256 of a model's weights and buffers (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        update_digest(digest, name, tensor)
    return digest.hexdigest()


def backbone_identity(name: str | os.PathLike, model: torch.nn.Module | None = None) -> dict:
    """What identifies the weights that make the tokens: a model passed in by the digest of its weights,
    otherwise what `models.resolve_backbone(name)` says `load_backbone(name)` would load."""
    from .models import resolve_backbone

    if model is not None:
        name = str(name)
        label = Path(name).name if name.endswith(".safetensors") else name
        return {"backbone": label, "weights": "the model passed in", "state_sha256": state_digest(model)}
    return resolve_backbone(name).identity()


def content_identity(dataset: Dataset) -> dict:
    """What identifies a dataset's images and labels: recipe and tensor digest, file list, or item digest."""
    if isinstance(dataset, torch.utils.data.Subset):
        indices = [int(i) for i in dataset.indices]
        return {"subset_of": content_identity(dataset.dataset), "n_images": len(indices),
                "indices_sha256": hashlib.sha256(json.dumps(indices).encode()).hexdigest()}
    key = getattr(dataset, "key", None)
    if isinstance(key, dict):  # a recipe; the digest of its tensors guards against changed or hand-built data
        tensors = {n: getattr(dataset, n) for n in ("images", "labels")
                   if isinstance(getattr(dataset, n, None), torch.Tensor)}
        return {**key, **({"content_sha256": tensors_digest(tensors)} if tensors else {})}
    if isinstance(dataset, torch.utils.data.TensorDataset):
        return {"tensors_sha256": tensors_digest({str(i): t for i, t in enumerate(dataset.tensors)}),
                "n_images": len(dataset)}
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list) and hasattr(dataset, "root"):  # torchvision's ImageFolder and DatasetFolder
        return {"root": str(dataset.root), "n_images": len(samples), "files_sha256": files_digest(samples)}
    return {"type": type(dataset).__name__, "n_images": len(dataset), "items_sha256": items_digest(dataset)}


def files_digest(samples: list[tuple[str, int]]) -> str:
    """Hex sha256 of a folder dataset's files: path, label, size and modification time of each."""
    digest = hashlib.sha256()
    for path, target in samples:
        info = os.stat(path)
        digest.update(f"{path}|{target}|{info.st_size}|{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def items_digest(dataset: Dataset) -> str:
    """Hex sha256 of every item a dataset returns (one pass over its data, no model)."""
    digest = hashlib.sha256()
    for i in range(len(dataset)):
        item = dataset[i]
        for j, part in enumerate(item if isinstance(item, (tuple, list)) else (item,)):
            if isinstance(part, torch.Tensor):
                update_digest(digest, f"{i}.{j}", part)
            elif hasattr(part, "tobytes"):  # numpy arrays and PIL images: their pixels, not their address
                layout = (getattr(part, "shape", getattr(part, "size", None)), getattr(part, "dtype", None),
                          getattr(part, "mode", None))
                digest.update(f"{i}.{j}|{type(part).__name__}|{layout}|".encode())
                digest.update(part.tobytes())
            else:
                digest.update(f"{i}.{j}|{part!r}|".encode())
    return digest.hexdigest()


def transform_identity(dataset: Dataset) -> str:
    """What the dataset does to its stored images before they reach the model."""
    base = dataset
    while isinstance(base, torch.utils.data.Subset):
        base = base.dataset
    transform = getattr(base, "transform", None)
    if transform is None:
        return "none (tensors as stored)"
    return repr(transform)


def dataset_identity(dataset: Dataset, data_key: str | None = None) -> dict:
    """What identifies a dataset split's content and transform (a caller's `data_key` replaces both)."""
    if data_key is not None:
        if not isinstance(data_key, str) or not data_key.strip():
            raise SelaggError(f"data_key={data_key!r} is not accepted: it must be a non-empty string that names "
                              "this exact content (images, labels and transform), e.g. 'my-scans-v3-val'.")
        return {"data": {"caller_key": data_key, "n_images": len(dataset)}, "transform": "part of data_key"}
    return {"data": content_identity(dataset), "transform": transform_identity(dataset)}


def entry_key(identity: dict, block: int | str, norm: bool, compute: str = "float32") -> dict:
    """The full key of one block's entry, from the weights' and the dataset's identity and the forward precision."""
    return {"format": CACHE_FORMAT, **identity, "block": block, "norm": norm, "dtype": "float16", "compute": compute}


def pooled_key(identity: dict, block: int | str, norm: bool, compute: str = "float32") -> dict:
    """The full key of a pooled entry: the tokens' key, marked pooled ([cls] and mean of patches, float32)."""
    return {**entry_key(identity, block, norm, compute), "pooled": True, "dtype": "float32 from float16 tokens"}


def cache_key(backbone: str | os.PathLike, dataset: Dataset, block: int | str, norm: bool,
              model: torch.nn.Module | None = None, data_key: str | None = None,
              device: str | torch.device = "cpu") -> dict:
    """The full key of a cache entry."""
    return entry_key({**backbone_identity(backbone, model), **dataset_identity(dataset, data_key)}, block, norm,
                     compute_precision(device))


def key_digest(key: dict) -> str:
    """A short stable name for a key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def key_text(key: dict) -> str:
    """A key as stored in an entry's metadata."""
    return json.dumps(key, sort_keys=True, default=str)


def entry_path(key: dict, directory: str | os.PathLike | None = None) -> Path:
    """Where the cache entry of a key lives."""
    return cache_dir(directory) / f"{key_digest(key)}.safetensors"


# ----------------------------------------------------------------------------- the checksum
class PieceDigest:
    """A tensor's digest fed in chunks of any size: sha256 of the sha256 of every DIGEST_PIECE bytes."""

    def __init__(self) -> None:
        self.pieces, self.piece, self.filled = hashlib.sha256(), hashlib.sha256(), 0

    def update(self, raw: memoryview) -> None:
        """Feed the next bytes."""
        while len(raw):
            take = min(len(raw), DIGEST_PIECE - self.filled)
            self.piece.update(raw[:take])
            self.filled, raw = self.filled + take, raw[take:]
            if self.filled == DIGEST_PIECE:
                self.pieces.update(self.piece.digest())
                self.piece, self.filled = hashlib.sha256(), 0

    def hexdigest(self) -> str:
        """The digest of every byte fed so far."""
        pieces = self.pieces.copy()
        if self.filled:
            pieces.update(self.piece.digest())
        return pieces.hexdigest()


def hashing_workers(n_pieces: int) -> int:
    """Threads that hash pieces at once (hashlib releases the GIL): up to 4, never more than the cores."""
    return max(1, min(n_pieces, 4, os.cpu_count() or 1))


def piece_digests(read: Callable[[int, int], bytes | memoryview], size: int) -> str:
    """The PieceDigest of `size` bytes, reading pieces with read(offset, length) on several threads."""
    starts = range(0, size, DIGEST_PIECE)

    def digest(start: int) -> bytes:
        return hashlib.sha256(read(start, min(DIGEST_PIECE, size - start))).digest()

    with ThreadPoolExecutor(hashing_workers(len(starts))) as pool:
        return hashlib.sha256(b"".join(pool.map(digest, starts))).hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes in memory order (copied only when it is not contiguous)."""
    t = tensor.detach().cpu().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def checksum_of(meta: dict[str, str], digests: dict[str, tuple[str, list[int], str]]) -> str:
    """Hex sha256 of an entry's metadata (without the checksum) and each tensor's (dtype, shape, digest)."""
    described = {"metadata": {k: v for k, v in meta.items() if k != "checksum"},
                 "tensors": {name: list(d) for name, d in digests.items()}}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def entry_checksum(state: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """The checksum of tensors in memory and their metadata, as a streamed entry stores it."""
    digests = {}
    for name, t in state.items():
        raw = tensor_bytes(t)
        digests[name] = (DTYPE_NAMES[t.dtype], list(t.shape), piece_digests(lambda s, n: raw[s:s + n], len(raw)))
    return checksum_of(meta, digests)


# ----------------------------------------------------------------------------- entries on disk
DTYPE_NAMES = {torch.int64: "I64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
_BLANK_CHECKSUM = "0" * 64
_ALIGN = 64


class DamagedEntry(Exception):
    """A cache entry that cannot be trusted (unreadable, truncated or changed); it is extracted again."""


@dataclass(frozen=True)
class Layout:
    """Where an entry's tensors lie: data start in the file and, per name, (dtype, shape, start, end) in the data."""

    data_start: int
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]

    @property
    def size(self) -> int:
        """The file size this layout describes."""
        return self.data_start + max((end for *_, end in self.tensors.values()), default=0)


def planned_layout(shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]], meta: dict[str, str]) -> Layout:
    """Tensors in a fixed order (largest element first, then by name), each aligned, after a padded header."""
    tensors, start = {}, 0
    for name in sorted(shapes, key=lambda n: (-shapes[n][0].itemsize, n)):
        dtype, shape = shapes[name]
        end = start + dtype.itemsize * math.prod(shape)
        tensors[name], start = (dtype, tuple(shape), start, end), end
    return Layout(8 + len(header_bytes(Layout(0, tensors), meta)), tensors)


def header_bytes(layout: Layout, meta: dict[str, str]) -> bytes:
    """The safetensors header (JSON, padded with spaces so that the data starts on a 64-byte boundary)."""
    header = {"__metadata__": meta, **{name: {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                                              "data_offsets": [start, end]}
                                       for name, (dtype, shape, start, end) in layout.tensors.items()}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-(8 + len(raw)) % _ALIGN)


_POSITIONED_IO = threading.Lock()  # seek-then-read/write where the OS has no pread/pwrite (Windows)


def _pwrite(fd: int, raw: memoryview, offset: int) -> int:
    """os.pwrite, or a seek and a write under a lock where it is missing."""
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, raw, offset)
    with _POSITIONED_IO:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, raw)


def _pread(fd: int, length: int, offset: int) -> bytes:
    """os.pread, or a seek and a read under a lock where it is missing."""
    if hasattr(os, "pread"):
        return os.pread(fd, length, offset)
    with _POSITIONED_IO:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, length)


def write_all(fd: int, raw: memoryview | bytes, offset: int) -> None:
    """Write every byte at `offset` (a short write is continued; a disk that takes nothing is an OSError)."""
    raw = memoryview(raw).cast("B")
    while len(raw):
        n = _pwrite(fd, raw, offset)
        if n == 0:
            raise OSError(28, os.strerror(28))
        raw, offset = raw[n:], offset + n


def read_exactly(fd: int, length: int, offset: int) -> bytes:
    """`length` bytes at `offset` (in as many reads as it takes), or a DamagedEntry when the file ends first."""
    parts, done = [], 0
    while done < length:
        part = _pread(fd, min(length - done, 1 << 30), offset + done)
        if not part:
            raise DamagedEntry("unreadable: it ends early")
        parts.append(part)
        done += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def mapped_state(fd: int, layout: Layout) -> dict[str, torch.Tensor]:
    """The tensors of an entry as copy-on-write views of its file (nothing is read until they are used)."""
    if layout.size == layout.data_start:
        return {name: torch.empty(shape, dtype=dtype) for name, (dtype, shape, _, _) in layout.tensors.items()}
    mapping = mmap.mmap(fd, layout.size, access=mmap.ACCESS_COPY)
    state = {}
    for name, (dtype, shape, start, end) in layout.tensors.items():
        count = (end - start) // dtype.itemsize
        state[name] = (torch.frombuffer(mapping, dtype=dtype, count=count, offset=layout.data_start + start)
                       .view(shape) if count else torch.empty(shape, dtype=dtype))
    return state


def temporary_file(path: Path) -> tuple[int, Path | None]:
    """An open file in the entry's folder to build it in: unnamed where possible (then None), else a named temporary."""
    if UNNAMED_TEMPORARIES:
        try:
            return os.open(path.parent, os.O_TMPFILE | os.O_RDWR, 0o600), None
        except OSError:  # this file system has no unnamed files
            pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path), suffix=".tmp")
    return fd, Path(tmp)


def named_temporary(fd: int, path: Path) -> Path:
    """Give an unnamed file a temporary name beside `path` (the name a later run recognises as an orphan)."""
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while True:
            tmp = path.with_name(f"{temporary_prefix(path)}{secrets.token_hex(4)}.tmp")
            try:
                os.link(f"/proc/self/fd/{fd}", tmp.name, dst_dir_fd=folder, follow_symlinks=True)
                return tmp
            except FileExistsError:
                continue
    finally:
        os.close(folder)


class EntryFile:
    """An entry being built: header first (blank checksum), rows streamed in and hashed, header rewritten, renamed."""

    def __init__(self, path: Path, shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]], meta: dict[str, str]):
        self.path, self.meta = path, {**meta, "checksum": _BLANK_CHECKSUM}
        self.layout = planned_layout(shapes, self.meta)
        self.rows = {name: 0 for name in shapes}
        self.digests = {name: PieceDigest() for name in shapes}
        self.fd, self.tmp = temporary_file(path)
        try:
            header = self.layout_header()
            write_all(self.fd, len(header).to_bytes(8, "little") + header, 0)
        except BaseException:
            self.discard()
            raise

    def layout_header(self) -> bytes:
        """The header for the current metadata (the same length whatever the checksum)."""
        return header_bytes(Layout(0, self.layout.tensors), self.meta)

    def row_bytes(self, name: str) -> int:
        """Bytes of one row (one image) of a tensor."""
        dtype, shape, _, _ = self.layout.tensors[name]
        return dtype.itemsize * math.prod(shape[1:])

    def write(self, name: str, rows: torch.Tensor) -> None:
        """Append rows (images) to a tensor, at its offset in the file, and hash them."""
        dtype, shape, start, _ = self.layout.tensors[name]
        if rows.dtype != dtype or tuple(rows.shape[1:]) != shape[1:] or self.rows[name] + len(rows) > shape[0]:
            raise SelaggError(f"Rows {tuple(rows.shape)} {rows.dtype} do not fit the entry's {name} {shape} {dtype} "
                              f"after {self.rows[name]} rows; a dataset must yield exactly len(dataset) items of one "
                              "shape (check its __len__ and transform).")
        raw = tensor_bytes(rows)
        write_all(self.fd, raw, self.layout.data_start + start + self.rows[name] * self.row_bytes(name))
        self.digests[name].update(raw)
        self.rows[name] += len(rows)

    def written(self, name: str, n_rows: int) -> torch.Tensor:
        """The first n_rows rows of a tensor, read back into memory."""
        dtype, shape, start, _ = self.layout.tensors[name]
        if n_rows == 0:
            return torch.empty((0, *shape[1:]), dtype=dtype)
        raw = bytearray(read_exactly(self.fd, n_rows * self.row_bytes(name), self.layout.data_start + start))
        return torch.frombuffer(raw, dtype=dtype).view(n_rows, *shape[1:])

    def publish(self) -> dict[str, torch.Tensor]:
        """Complete the header with the checksum, give the file its final name, and return its tensors mapped."""
        expected = next(iter(self.layout.tensors.values()))[1][0]
        got = min(self.rows.values())
        if got != expected:
            raise SelaggError(f"The dataset gave {got} items although its length is {expected}; a dataset must "
                              "yield exactly len(dataset) items (check its __len__).")
        self.meta["checksum"] = checksum_of(self.meta, {
            name: (DTYPE_NAMES[dtype], list(shape), self.digests[name].hexdigest())
            for name, (dtype, shape, _, _) in self.layout.tensors.items()})
        write_all(self.fd, self.layout_header(), 8)
        if self.tmp is None:
            self.tmp = named_temporary(self.fd, self.path)
        os.replace(self.tmp, self.path)
        self.tmp = None
        state = mapped_state(self.fd, self.layout)
        self.discard()
        return state

    def mapped(self) -> dict[str, torch.Tensor]:
        """The tensors written so far, mapped from the file (which need not have a name)."""
        return mapped_state(self.fd, self.layout)

    def discard(self) -> None:
        """Close the file and remove its temporary name, if any (an unnamed file vanishes when closed)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.tmp is not None:
            try:
                os.remove(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None


def refusal_reason(err: OSError) -> str:
    """What the disk said when it refused a write."""
    return err.strerror or str(err)


class EntrySink:
    """Where one entry's rows go during extraction: its file, streamed (or memory without a path, or once the disk
    refuses the file: then one line says so and the rows are returned all the same)."""

    def __init__(self, path: Path | None, meta: dict[str, str], n_rows: int, what: str = "tokens"):
        self.path, self.meta, self.n_rows, self.what = path, meta, n_rows, what
        self.file: EntryFile | None = None
        self.memory: dict[str, list[torch.Tensor]] | None = None if path is not None else {}
        self.done = 0

    def add(self, rows: dict[str, torch.Tensor]) -> None:
        """Take one batch's rows (one tensor per name, each with the batch's images first)."""
        if self.memory is None:
            try:
                if self.file is None:
                    self.file = EntryFile(self.path, {n: (t.dtype, (self.n_rows, *t.shape[1:]))
                                                      for n, t in rows.items()}, self.meta)
                for name, t in rows.items():
                    self.file.write(name, t)
                self.done += len(next(iter(rows.values())))
                return
            except OSError as err:
                self.keep_in_memory(err)
        for name, t in rows.items():
            self.memory.setdefault(name, []).append(t)
        self.done += len(next(iter(rows.values())))

    def keep_in_memory(self, err: OSError) -> None:
        """The disk refused the file: read back what it holds, drop it, and say so in one line."""
        self.memory = {}
        if self.file is not None:
            self.memory = {name: [self.file.written(name, self.done)] for name in self.file.rows}
            self.file.discard()
            self.file = None
        notice(f"Could not store the cache entry {self.path} ({refusal_reason(err)}); the {self.what} are used now "
               "but will be extracted again next time.")

    def result(self) -> dict[str, torch.Tensor]:
        """The entry's tensors: mapped from the finished file, or from memory."""
        if self.memory is None:
            try:
                return self.file.publish()
            except OSError as err:  # the file is complete but cannot be named: keep it mapped, unnamed
                state = self.file.mapped()
                self.file.discard()
                notice(f"Could not store the cache entry {self.path} ({refusal_reason(err)}); the {self.what} are "
                       "used now but will be extracted again next time.")
                return state
        return {name: torch.cat(parts) for name, parts in self.memory.items()}

    def discard(self) -> None:
        """Drop whatever was written (an extraction that failed)."""
        if self.file is not None:
            self.file.discard()
            self.file = None


def token_meta(key: dict, num_prefix: int, has_cls: bool, grid_size: tuple[int, int]) -> dict[str, str]:
    """An entry's metadata before its checksum: the key and the token layout."""
    return {"key": key_text(key), "num_prefix_tokens": str(num_prefix), "has_cls": str(int(has_cls)),
            "grid_size": json.dumps(list(grid_size))}


def save_entry(path: Path, tokens: TokenSet) -> None:
    """Write one entry of tokens already at hand, a chunk of images at a time, through a temporary file."""
    meta = token_meta(tokens.key, tokens.num_prefix_tokens, tokens.has_cls, tokens.grid_size)
    entry = EntryFile(path, {"labels": (torch.int64, (len(tokens),)),
                             "tokens": (torch.float16, tuple(tokens.tokens.shape))}, meta)
    try:
        entry.write("labels", tokens.labels.to(torch.int64))
        step = images_per_chunk(tokens.tokens)
        for i in range(0, len(tokens), step):
            entry.write("tokens", tokens.tokens[i:i + step].to(torch.float16))
        entry.publish()
    finally:
        entry.discard()


def entry_layout(fd: int, file_size: int) -> tuple[Layout, dict[str, str]]:
    """An entry's layout and metadata from its header, or a DamagedEntry when they do not describe the file."""
    size = int.from_bytes(read_exactly(fd, 8, 0), "little")
    if size > min(file_size - 8, 100 << 20):
        raise DamagedEntry("unreadable: its header length does not fit the file")
    try:
        header = json.loads(read_exactly(fd, size, 8).decode("utf-8"))
        meta = header.pop("__metadata__", {})
        tensors = {}
        for name, info in header.items():
            dtype, shape, (start, end) = DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
            if not all(isinstance(x, int) and x >= 0 for x in (*shape, start, end)):
                raise ValueError("negative or fractional sizes")
            tensors[name] = (dtype, shape, start, end)
    except DamagedEntry:
        raise
    except Exception as err:  # not UTF-8, not JSON, or not safetensors' fields
        raise DamagedEntry(f"unreadable: {type(err).__name__} in its header") from None
    layout, offset = Layout(8 + size, tensors), 0
    for dtype, shape, start, end in sorted(tensors.values(), key=lambda t: t[2]):
        if start != offset or end - start != dtype.itemsize * math.prod(shape):
            raise DamagedEntry("unreadable: its header does not describe its bytes")
        offset = end
    if layout.size != file_size or not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise DamagedEntry("unreadable: its header does not describe its bytes")
    return layout, meta


def file_checksum(fd: int, layout: Layout, meta: dict[str, str]) -> str:
    """The checksum of an entry on disk, streaming over its file in pieces (on several threads)."""
    digests = {}
    for name, (dtype, shape, start, end) in layout.tensors.items():
        at = layout.data_start + start
        digests[name] = (DTYPE_NAMES[dtype], list(shape),
                         piece_digests(lambda s, n, at=at: read_exactly(fd, n, at + s), end - start))
    return checksum_of(meta, digests)


#: Entries up to this size are verified on every load (see scripts/bench_cache.py for the cost); a larger
#: one is verified on its first load in a process and again whenever its size, mtime or inode change.
VERIFY_EVERY_LOAD_BYTES = 4 << 30
_VERIFIED_LARGE: dict[str, tuple[int, int, int]] = {}


def read_entry(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An entry's tensors (mapped) and metadata, verified against its checksum; DamagedEntry when they do not match."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        raise DamagedEntry(f"unreadable: {type(err).__name__}") from None
    try:
        info = os.fstat(fd)
        layout, meta = entry_layout(fd, info.st_size)
        stamp = (info.st_size, info.st_mtime_ns, info.st_ino)
        large = info.st_size > VERIFY_EVERY_LOAD_BYTES
        if not (large and _VERIFIED_LARGE.get(str(path)) == stamp):
            if meta.get("checksum") != file_checksum(fd, layout, meta):
                raise DamagedEntry("its checksum does not match its content")
            if large:
                _VERIFIED_LARGE[str(path)] = stamp
        return mapped_state(fd, layout), meta
    except (OSError, ValueError) as err:  # ValueError: mmap of a file that shrank meanwhile
        raise DamagedEntry(f"unreadable: {type(err).__name__}") from None
    finally:
        os.close(fd)


def verified_state(path: Path, key: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A verified entry's tensors and metadata; a SelaggError when its stored key is not the requested one."""
    state, meta = read_entry(path)
    if meta.get("key") != key_text(key):
        raise SelaggError(f"The cache entry {path} holds the tokens of another request (its stored key differs "
                          f"from the one asked for); delete that file or point {CACHE_ENV} to a clean folder.")
    return state, meta


def check_names(state: dict[str, torch.Tensor], names: set[str]) -> None:
    """Raise a DamagedEntry when an entry of the right key holds other tensors than its kind has."""
    if set(state) != names:
        raise DamagedEntry(f"it holds {sorted(state)} instead of {sorted(names)}")


def load_entry(path: Path, key: dict) -> TokenSet:
    """Read a verified entry of tokens, and refuse it when its stored key is not the requested one."""
    state, meta = verified_state(path, key)
    check_names(state, {"tokens", "labels"})
    return TokenSet(state["tokens"], state["labels"], int(meta["num_prefix_tokens"]), bool(int(meta["has_cls"])),
                    tuple(json.loads(meta["grid_size"])), key)


def load_pooled(path: Path, key: dict) -> PooledFeatures:
    """Read a verified pooled entry, and refuse it when its stored key is not the requested one."""
    state, meta = verified_state(path, key)
    check_names(state, {"labels", "mean"} | ({"cls"} if meta.get("has_cls") == "1" else set()))
    return PooledFeatures(state.get("cls"), state["mean"], state["labels"], key)


def loaded_entry(path: Path, key: dict, quiet: bool = False,
                 load: Callable[[Path, dict], object] = load_entry) -> TokenSet | PooledFeatures | None:
    """The entry at `path` if it is there and intact; None (with one line unless quiet) when it must be extracted."""
    if not path.is_file():
        return None
    try:
        return load(path, key)
    except DamagedEntry as err:
        if not quiet:
            notice(f"The cache entry {path} is damaged ({err}); extracting its tokens again.")
        return None


# ----------------------------------------------------------------------------- locks
def _lock_file(path: Path) -> Path:
    """The lock file of an entry: `.<entry name>.lock` beside it."""
    return path.with_name(f".{path.name}.lock")


def _take_lock(lock: Path, wait: bool = True) -> int | None:
    """An open descriptor holding an exclusive flock on `lock` (None when busy and wait=False).

    A holder deletes its lock file before releasing it, so after the lock is taken the file is
    checked to still be the one locked; if not, the lock is taken again on the new file.
    """
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:
            os.close(fd)
            raise
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return fd
        os.close(fd)


def _release_lock(lock: Path, fd: int) -> None:
    """Delete the lock file, then release the lock."""
    try:
        os.unlink(lock)
    except FileNotFoundError:
        pass
    os.close(fd)


@contextmanager
def entries_locked(paths: list[Path]) -> Iterator[None]:
    """Hold each entry's lock while it is filled, so that other processes wait and then load it.

    Locks are taken in one order (no deadlock) and released by the kernel if the process dies.
    Where the file system offers no locks, concurrent fills stay correct (each writes a whole file
    and renames it) and only repeat the work.
    """
    held: list[tuple[Path, int]] = []
    try:
        if fcntl is not None:
            for path in sorted(paths):
                lock = _lock_file(path)
                try:
                    held.append((lock, _take_lock(lock)))
                except OSError:  # no locks on this file system
                    break
        yield
    finally:
        for lock, fd in reversed(held):
            _release_lock(lock, fd)


def remove_stale_locks(folder: Path) -> None:
    """Delete lock files no process holds (left by a process that was killed)."""
    if fcntl is None:
        return
    for lock in folder.glob(".*.safetensors.lock"):
        try:
            fd = _take_lock(lock, wait=False)
        except OSError:
            continue
        if fd is not None:
            _release_lock(lock, fd)


# ----------------------------------------------------------------------------- the cache
def cached_entries(paths: list[Path], keys: list[dict], directory: str | os.PathLike | None,
                   extract: Callable[[list[int], Path], list], load: Callable = load_entry) -> list:
    """Each entry loaded when intact, else extracted once under its lock by extract(missing indices, folder)."""
    found = {i: e for i, e in enumerate(loaded_entry(p, k, load=load) for p, k in zip(paths, keys)) if e is not None}
    missing = [i for i in range(len(paths)) if i not in found]
    if missing:
        folder = writable_cache_dir(directory)  # before the work, not after it
        remove_orphaned_temporaries(folder)
        remove_stale_locks(folder)
        with entries_locked([paths[i] for i in missing]):
            for i in missing:  # another process may have filled them while this one waited
                entry = loaded_entry(paths[i], keys[i], quiet=True, load=load)
                if entry is not None:
                    found[i] = entry
            missing = [i for i in missing if i not in found]
            if missing:
                found.update(zip(missing, extract(missing, folder)))
    return [found[i] for i in range(len(paths))]


def cached_blocks(backbone: str | os.PathLike, dataset: Dataset, blocks: list[int | None] | None = None,
                  norm: bool = True, batch_size: int = 256, device: str | torch.device = "cpu",
                  directory: str | os.PathLike | None = None, progress: bool = True,
                  model: VisionTransformer | None = None, data_key: str | None = None,
                  num_workers: int | None = None) -> list[TokenSet]:
    """Tokens after each block (None = the last block, after the final norm), extracting only what is not cached.

    `model` replaces the weights `backbone` names (the key then holds the digest of its weights);
    `data_key` names the dataset's content when the caller wants to skip digesting it; `num_workers`
    loader processes read the images (None: 0 on a CPU, up to 4 on CUDA).
    """
    from .models import has_cls_token, load_backbone, num_prefix_tokens, patch_grid

    check_extraction_inputs(dataset, batch_size)
    loader_workers(num_workers, device)
    blocks = [None] if blocks is None else list(blocks)
    identity = {**backbone_identity(backbone, model), **dataset_identity(dataset, data_key)}
    compute = compute_precision(device)
    keys = [entry_key(identity, "last" if b is None else b, True if b is None else norm, compute) for b in blocks]
    paths = [entry_path(k, directory) for k in keys]

    def extract(missing: list[int], folder: Path) -> list[TokenSet]:
        net = model if model is not None else load_backbone(backbone, device=device)
        check_disk_space(folder, len(missing) * token_entry_bytes(len(dataset), *token_shape(net)))
        info = (num_prefix_tokens(net), has_cls_token(net), tuple(patch_grid(net)))
        sinks = [EntrySink(paths[i], token_meta(keys[i], *info), len(dataset)) for i in missing]
        tokens, labels = extract_blocks(net, dataset, [blocks[i] for i in missing], batch_size, device, norm,
                                        progress, num_workers=num_workers, into=sinks)
        return [TokenSet(t, labels, *info, keys[i]) for i, t in zip(missing, tokens)]

    return cached_entries(paths, keys, directory, extract)


def cached_tokens(backbone: str | os.PathLike, dataset: Dataset, block: int | None = None, norm: bool = True,
                  batch_size: int = 256, device: str | torch.device = "cpu", directory: str | os.PathLike | None = None,
                  progress: bool = True, model: VisionTransformer | None = None,
                  data_key: str | None = None, num_workers: int | None = None) -> TokenSet:
    """Tokens of one block (None = last block after the final norm), from the cache or extracted and cached."""
    return cached_blocks(backbone, dataset, [block], norm, batch_size, device, directory, progress, model,
                         data_key, num_workers)[0]


def split_tokens(settings, name: str, split: str, device: str | torch.device = "cpu") -> TokenSet:
    """Last-block tokens of backbone `name` on one split of a scale's dataset (a config.ScaleSettings), with the
    images read as the backbone's checkpoint expects them: from the cache, extracted on first use."""
    from .data import load_split
    from .models import data_config

    dataset = load_split(settings, split, data_config(name))
    return cached_tokens(name, dataset, batch_size=settings.batch_size, device=device)


def pooled_features(backbone: str | os.PathLike, dataset: Dataset, block: int | None = None, norm: bool = True,
                    batch_size: int = 256, device: str | torch.device = "cpu",
                    directory: str | os.PathLike | None = None, progress: bool = True,
                    model: VisionTransformer | None = None, data_key: str | None = None,
                    num_workers: int | None = None) -> PooledFeatures:
    """[cls] (None without one) and mean of the patch tokens, (N, D) float32, and labels: cached, never the tokens.

    The patch mean leaves out the [cls] and register tokens (the model's `num_prefix_tokens`); both
    are pooled from the float16 tokens, so they equal `.cls` and `.mean_patches` of `cached_tokens`.
    """
    from .models import has_cls_token, load_backbone, num_prefix_tokens, patch_grid

    check_extraction_inputs(dataset, batch_size)
    loader_workers(num_workers, device)
    identity = {**backbone_identity(backbone, model), **dataset_identity(dataset, data_key)}
    key = pooled_key(identity, "last" if block is None else block, True if block is None else norm,
                     compute_precision(device))
    path = entry_path(key, directory)

    def extract(missing: list[int], folder: Path) -> list[PooledFeatures]:
        net = model if model is not None else load_backbone(backbone, device=device)
        has_cls = has_cls_token(net)
        check_disk_space(folder, pooled_entry_bytes(len(dataset), token_shape(net)[1], has_cls))
        meta = token_meta(key, num_prefix_tokens(net), has_cls, tuple(patch_grid(net)))
        sink = EntrySink(path, meta, len(dataset), what="pooled features")
        held = extract_pooled(net, dataset, block, batch_size, device, norm, progress, num_workers, into=sink)
        return [PooledFeatures(held.get("cls"), held["mean"], held["labels"], key)]

    return cached_entries([path], [key], directory, extract, load=load_pooled)[0]
