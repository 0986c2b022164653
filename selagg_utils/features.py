"""Frozen tokens: run a backbone once over a dataset and keep its output tokens, cached on disk.

A cache entry is one safetensors file holding the tokens (float16), the labels and, in its metadata,
the key that produced it and a checksum. The key holds everything that determines the tokens: the
weights actually used (a checkpoint's sha256, a timm name with its pretrained tag, random weights
with their seed, or the digest of a model passed in), the dataset's content (its recipe and split
and a digest of its tensors, a digest of its files or items, or a key the caller gives), the
transform, the block and the dtype. The file name is a digest of the key.

On load the checksum (of the tensors and the metadata) is verified: a truncated or changed entry
is extracted again, with one line saying so; an intact entry whose stored key differs from the
request is refused with a sentence naming the file. The folder is checked for being a writable
folder before any extraction; files are written to a temporary name and renamed, so an extraction
killed at any moment leaves nothing a later run would load, and its temporary file is removed by
the next run. Processes filling one entry at once take turns through a lock file beside the entry:
one extracts, the others wait and then load its entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, Dataset

from .checkpoints import (_atomic_write, read_manifest, remove_orphaned_temporaries, sha256_of,
                          temporary_prefix)
from .checks import check_finite_items, notice, tensors_digest, update_digest, whole_number
from .errors import SelaggError
from .progress import progress_bar

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent fills only repeat the work
    fcntl = None

CACHE_ENV = "SELAGG_CACHE"
CACHE_FORMAT = 2
_REPAIR = "remove or repair it, or pass a dataset without it"


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


@torch.inference_mode()
def extract_blocks(model: VisionTransformer, dataset: Dataset, blocks: list[int | None], batch_size: int = 256,
                   device: str | torch.device = "cpu", norm: bool = True, progress: bool = True,
                   dtype: torch.dtype = torch.float16) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Tokens after several blocks in one pass over the data: ([(N, T, D)] per block, labels (N,))."""
    check_extraction_inputs(dataset, batch_size)
    model.eval().to(device)
    per_block: list[list[torch.Tensor]] = [[] for _ in blocks]
    labels: list[torch.Tensor] = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in progress_bar(loader, enabled=progress, desc="extracting tokens", leave=False):
        done = sum(len(y) for y in labels)
        check_finite_items(batch[0], "Image", done, _REPAIR)
        for store, tokens in zip(per_block, tokens_after(model, batch[0].to(device), blocks, norm)):
            store.append(tokens.to(dtype).cpu())
            check_finite_items(store[-1], f"The backbone's {dtype} tokens of image", done,
                               "the backbone produced NaN or values beyond that dtype's range: check its weights, "
                               "or extract in float32")
        labels.append(torch.as_tensor(batch[1]))
    return [torch.cat(s) for s in per_block], torch.cat(labels)


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
        """The mean of the patch tokens of every image, (N, D) float32."""
        return self.patches.float().mean(1)

    def head_kwargs(self) -> dict:
        """What `aggregation.make_head` needs to know about these tokens."""
        return dict(dim=self.dim, num_prefix_tokens=self.num_prefix_tokens, has_cls=self.has_cls,
                    grid_size=self.grid_size)

    def subset(self, index: torch.Tensor) -> "TokenSet":
        """The same tokens restricted to some images."""
        return TokenSet(self.tokens[index], self.labels[index], self.num_prefix_tokens, self.has_cls,
                        self.grid_size, {**self.key, "subset": True})


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


# ----------------------------------------------------------------------------- what identifies an entry
def state_digest(model: torch.nn.Module) -> str:
    """Hex sha256 of a model's weights and buffers (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        update_digest(digest, name, tensor)
    return digest.hexdigest()


def backbone_identity(name: str | os.PathLike, model: torch.nn.Module | None = None) -> dict:
    """What identifies the weights that make the tokens.

    A model passed in: the digest of its weights. Otherwise what `load_backbone(name)` would load: a
    tiny name or a file with its sha256, a timm name with its pretrained tag, or random weights with
    their seed (timm names without pretrained weights, and `random:<timm name>`).
    """
    import timm

    from .config import scale
    from .models import RANDOM_INIT_SEED, TINY_NAMES, tiny_checkpoint_path, uses_pretrained_weights

    name = str(name)
    label = Path(name).name if name.endswith(".safetensors") else name
    if model is not None:
        return {"backbone": label, "weights": "the model passed in", "state_sha256": state_digest(model)}
    if name in TINY_NAMES:
        return {"backbone": name, "sha256": read_manifest(tiny_checkpoint_path(name))["sha256"]}
    if name.endswith(".safetensors") or Path(name).is_file():
        return {"backbone": Path(name).name, "sha256": sha256_of(name)}
    arch = name[len("random:"):] if name.startswith("random:") else name
    if timm.is_model(arch):
        random_weights = {"weights": "random", "seed": RANDOM_INIT_SEED, "timm": timm.__version__,
                          "torch": torch.__version__.split("+")[0]}
        if arch != name or not uses_pretrained_weights(scale(), None):
            return {"backbone": name, **random_weights}
        cfg = timm.models.get_pretrained_cfg(name)
        source = (cfg.hf_hub_id or cfg.url or "") if cfg is not None else ""
        return {"backbone": name, "weights": "pretrained", "tag": getattr(cfg, "tag", None) or "default",
                "source": source, "timm": timm.__version__}
    raise SelaggError(f"Unknown backbone {name!r}: use a tiny name, a local .safetensors file or a timm name.")


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


def entry_key(identity: dict, block: int | str, norm: bool) -> dict:
    """The full key of one block's entry, from the weights' and the dataset's identity."""
    return {"format": CACHE_FORMAT, **identity, "block": block, "norm": norm, "dtype": "float16"}


def cache_key(backbone: str | os.PathLike, dataset: Dataset, block: int | str, norm: bool,
              model: torch.nn.Module | None = None, data_key: str | None = None) -> dict:
    """The full key of a cache entry."""
    return entry_key({**backbone_identity(backbone, model), **dataset_identity(dataset, data_key)}, block, norm)


def key_digest(key: dict) -> str:
    """A short stable name for a key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def entry_path(key: dict, directory: str | os.PathLike | None = None) -> Path:
    """Where the cache entry of a key lives."""
    return cache_dir(directory) / f"{key_digest(key)}.safetensors"


# ----------------------------------------------------------------------------- entries on disk
class DamagedEntry(Exception):
    """A cache entry that cannot be trusted (unreadable, truncated or changed); it is extracted again."""


def entry_checksum(state: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """Hex sha256 of an entry's tensors (dtype, shape, bytes) and of its metadata other than the checksum."""
    return tensors_digest(state, json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True))


def save_entry(path: Path, tokens: TokenSet) -> None:
    """Write one entry atomically (temporary file, then rename), with its checksum in the metadata."""
    meta = {"key": json.dumps(tokens.key, sort_keys=True, default=str),
            "num_prefix_tokens": str(tokens.num_prefix_tokens), "has_cls": str(int(tokens.has_cls)),
            "grid_size": json.dumps(list(tokens.grid_size))}
    state = {"tokens": tokens.tokens.to(torch.float16).contiguous(),
             "labels": tokens.labels.to(torch.int64).contiguous()}
    meta["checksum"] = entry_checksum(state, meta)
    _atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


#: Entries up to this size are verified on every load (see scripts/bench_cache.py for the cost); a larger
#: one is verified on its first load in a process and again whenever its size, mtime or inode change.
VERIFY_EVERY_LOAD_BYTES = 4 << 30
_VERIFIED_LARGE: dict[str, tuple[int, int, int]] = {}


def read_entry(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An entry's tensors and metadata, verified against its checksum; DamagedEntry when they do not match."""
    try:
        info = path.stat()
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {name: f.get_tensor(name) for name in ("tokens", "labels")}
    except Exception as err:  # truncated or garbled: safetensors, OS and decoding errors alike
        raise DamagedEntry(f"unreadable: {type(err).__name__}") from None
    stamp = (info.st_size, info.st_mtime_ns, info.st_ino)
    if info.st_size > VERIFY_EVERY_LOAD_BYTES and _VERIFIED_LARGE.get(str(path)) == stamp:
        return state, meta
    if meta.get("checksum") != entry_checksum(state, meta):
        raise DamagedEntry("its checksum does not match its content")
    if info.st_size > VERIFY_EVERY_LOAD_BYTES:
        _VERIFIED_LARGE[str(path)] = stamp
    return state, meta


def load_entry(path: Path, key: dict) -> TokenSet:
    """Read a verified entry, and refuse it when its stored key is not the requested one."""
    state, meta = read_entry(path)
    if meta["key"] != json.dumps(key, sort_keys=True, default=str):
        raise SelaggError(f"The cache entry {path} holds the tokens of another request (its stored key differs "
                          f"from the one asked for); delete that file or point {CACHE_ENV} to a clean folder.")
    return TokenSet(state["tokens"], state["labels"], int(meta["num_prefix_tokens"]), bool(int(meta["has_cls"])),
                    tuple(json.loads(meta["grid_size"])), key)


def loaded_entry(path: Path, key: dict, quiet: bool = False) -> TokenSet | None:
    """The entry at `path` if it is there and intact; None (with one line unless quiet) when it must be extracted."""
    if not path.is_file():
        return None
    try:
        return load_entry(path, key)
    except DamagedEntry as err:
        if not quiet:
            notice(f"The cache entry {path} is damaged ({err}); extracting its tokens again.")
        return None


def stored(path: Path, entry: TokenSet) -> None:
    """Save an entry; when the disk refuses, say so in one line and keep going (the tokens are still returned)."""
    try:
        save_entry(path, entry)
    except (OSError, SafetensorError) as err:  # safetensors reports a full disk as a SafetensorError
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        notice(f"Could not store the cache entry {path} ({reason}); the tokens are used now but will be extracted "
               "again next time.")


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


def cached_blocks(backbone: str | os.PathLike, dataset: Dataset, blocks: list[int | None] | None = None,
                  norm: bool = True, batch_size: int = 256, device: str | torch.device = "cpu",
                  directory: str | os.PathLike | None = None, progress: bool = True,
                  model: VisionTransformer | None = None, data_key: str | None = None) -> list[TokenSet]:
    """Tokens after each block (None = the last block, after the final norm), extracting only what is not cached.

    `model` replaces the weights `backbone` names (the key then holds the digest of its weights);
    `data_key` names the dataset's content when the caller wants to skip digesting it.
    """
    from .models import has_cls_token, load_backbone, num_prefix_tokens, patch_grid

    check_extraction_inputs(dataset, batch_size)
    blocks = [None] if blocks is None else list(blocks)
    identity = {**backbone_identity(backbone, model), **dataset_identity(dataset, data_key)}
    keys = [entry_key(identity, "last" if b is None else b, True if b is None else norm) for b in blocks]
    paths = [entry_path(k, directory) for k in keys]
    found = {i: entry for i, entry in enumerate(loaded_entry(p, k) for p, k in zip(paths, keys)) if entry is not None}
    missing = [i for i in range(len(blocks)) if i not in found]
    if missing:
        folder = writable_cache_dir(directory)  # before the work, not after it
        remove_orphaned_temporaries(folder)
        remove_stale_locks(folder)
        with entries_locked([paths[i] for i in missing]):
            for i in missing:  # another process may have filled them while this one waited
                entry = loaded_entry(paths[i], keys[i], quiet=True)
                if entry is not None:
                    found[i] = entry
            missing = [i for i in missing if i not in found]
            if missing:
                model = model if model is not None else load_backbone(backbone, device=device)
                tokens, labels = extract_blocks(model, dataset, [blocks[i] for i in missing], batch_size, device,
                                                norm, progress)
                info = (num_prefix_tokens(model), has_cls_token(model), tuple(patch_grid(model)))
                for i, t in zip(missing, tokens):
                    found[i] = TokenSet(t, labels, *info, keys[i])
                    stored(paths[i], found[i])
    return [found[i] for i in range(len(blocks))]


def cached_tokens(backbone: str | os.PathLike, dataset: Dataset, block: int | None = None, norm: bool = True,
                  batch_size: int = 256, device: str | torch.device = "cpu", directory: str | os.PathLike | None = None,
                  progress: bool = True, model: VisionTransformer | None = None,
                  data_key: str | None = None) -> TokenSet:
    """Tokens of one block (None = last block after the final norm), from the cache or extracted and cached."""
    return cached_blocks(backbone, dataset, [block], norm, batch_size, device, directory, progress, model,
                         data_key)[0]
