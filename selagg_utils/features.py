"""Frozen tokens: run a backbone once over a dataset and keep its output tokens, cached on disk.

A cache entry is one safetensors file holding the tokens (float16), the labels and, in its metadata,
the key that produced it: backbone and checkpoint hash, dataset recipe and split, transform, block.
The file name is a digest of that key; on load the stored key is compared with the request, so a
renamed or stale file is refused instead of silently used. Files are written to a temporary name and
renamed, so an extraction killed halfway leaves nothing a later run would load.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, Dataset

from .checkpoints import _atomic_write, read_manifest, sha256_of
from .errors import SelaggError
from .progress import progress_bar

CACHE_ENV = "SELAGG_CACHE"
CACHE_FORMAT = 1


@torch.inference_mode()
def extract_tokens(model: VisionTransformer, dataset: Dataset, batch_size: int = 256, device: str | torch.device = "cpu",
                   progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """All output tokens after the final norm, (N, T, D) float32 with prefix tokens first, and labels (N,)."""
    model.eval().to(device)
    tokens, labels = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in progress_bar(loader, enabled=progress, desc="extracting tokens", leave=False):
        images, y = batch[0], batch[1]
        tokens.append(model.forward_features(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(tokens), torch.cat(labels)


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
    model.eval().to(device)
    per_block: list[list[torch.Tensor]] = [[] for _ in blocks]
    labels = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in progress_bar(loader, enabled=progress, desc="extracting tokens", leave=False):
        for store, tokens in zip(per_block, tokens_after(model, batch[0].to(device), blocks, norm)):
            store.append(tokens.to(dtype).cpu())
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


def backbone_identity(name: str | os.PathLike) -> dict:
    """What identifies a backbone's weights: a tiny name or file with its sha256, or a timm name and its source."""
    import timm

    from .models import TINY_NAMES, tiny_checkpoint_path

    name = str(name)
    if name in TINY_NAMES:
        return {"backbone": name, "sha256": read_manifest(tiny_checkpoint_path(name)).get("sha256")}
    if name.endswith(".safetensors") or Path(name).is_file():
        return {"backbone": Path(name).name, "sha256": sha256_of(name)}
    if timm.is_model(name):
        cfg = timm.models.get_pretrained_cfg(name)
        source = (cfg.hf_hub_id or cfg.url or "") if cfg is not None else ""
        return {"backbone": name, "weights": source, "timm": timm.__version__}
    raise SelaggError(f"Unknown backbone {name!r}: use a tiny name, a local .safetensors file or a timm name.")


def dataset_identity(dataset: Dataset) -> dict:
    """What identifies a dataset split's content and transform (its `.key` when it has one)."""
    if hasattr(dataset, "key"):
        return {"data": dataset.key, "transform": "none (tensors as stored)"}
    base, indices = dataset, None
    if isinstance(dataset, torch.utils.data.Subset):
        base, indices = dataset.dataset, list(dataset.indices)
    root = str(getattr(base, "root", type(base).__name__))
    digest = hashlib.sha256(json.dumps(indices).encode()).hexdigest()[:16] if indices is not None else "all"
    return {"data": {"root": root, "n_images": len(dataset), "indices": digest},
            "transform": repr(getattr(base, "transform", None))}


def cache_key(backbone: str | os.PathLike, dataset: Dataset, block: int | str, norm: bool) -> dict:
    """The full key of a cache entry."""
    return {"format": CACHE_FORMAT, **backbone_identity(backbone), **dataset_identity(dataset),
            "block": block, "norm": norm, "dtype": "float16"}


def key_digest(key: dict) -> str:
    """A short stable name for a key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def entry_path(key: dict, directory: str | os.PathLike | None = None) -> Path:
    """Where the cache entry of a key lives."""
    return cache_dir(directory) / f"{key_digest(key)}.safetensors"


def save_entry(path: Path, tokens: TokenSet) -> None:
    """Write one entry atomically (temporary file, then rename)."""
    meta = {"key": json.dumps(tokens.key, sort_keys=True, default=str),
            "num_prefix_tokens": str(tokens.num_prefix_tokens), "has_cls": str(int(tokens.has_cls)),
            "grid_size": json.dumps(list(tokens.grid_size))}
    state = {"tokens": tokens.tokens.to(torch.float16).contiguous(),
             "labels": tokens.labels.to(torch.int64).contiguous()}
    _atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def load_entry(path: Path, key: dict) -> TokenSet:
    """Read an entry and refuse it when its stored key is not the requested one."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        stored = meta.get("key")
        wanted = json.dumps(key, sort_keys=True, default=str)
        if stored != wanted:
            raise SelaggError(f"The cache entry {path.name} was made for another request (stored key differs from "
                              f"the one asked for); delete it or point {CACHE_ENV} to a clean folder.")
        tokens, labels = f.get_tensor("tokens"), f.get_tensor("labels")
    return TokenSet(tokens, labels, int(meta["num_prefix_tokens"]), bool(int(meta["has_cls"])),
                    tuple(json.loads(meta["grid_size"])), key)


def cached_blocks(backbone: str | os.PathLike, dataset: Dataset, blocks: list[int | None] | None = None,
                  norm: bool = True, batch_size: int = 256, device: str | torch.device = "cpu",
                  directory: str | os.PathLike | None = None, progress: bool = True,
                  model: VisionTransformer | None = None) -> list[TokenSet]:
    """Tokens after each block (None = the last block, after the final norm), extracting only what is not cached."""
    from .models import has_cls_token, load_backbone, num_prefix_tokens, patch_grid

    blocks = [None] if blocks is None else list(blocks)
    keys = [cache_key(backbone, dataset, "last" if b is None else b, True if b is None else norm) for b in blocks]
    found: dict[int, TokenSet] = {i: load_entry(entry_path(k, directory), k) for i, k in enumerate(keys)
                                  if entry_path(k, directory).is_file()}
    missing = [i for i in range(len(blocks)) if i not in found]
    if missing:
        model = model if model is not None else load_backbone(backbone, device=device)
        tokens, labels = extract_blocks(model, dataset, [blocks[i] for i in missing], batch_size, device, norm,
                                        progress)
        info = (num_prefix_tokens(model), has_cls_token(model), tuple(patch_grid(model)))
        for i, t in zip(missing, tokens):
            entry = TokenSet(t, labels, *info, keys[i])
            save_entry(entry_path(keys[i], directory), entry)
            found[i] = entry
    return [found[i] for i in range(len(blocks))]


def cached_tokens(backbone: str | os.PathLike, dataset: Dataset, block: int | None = None, norm: bool = True,
                  batch_size: int = 256, device: str | torch.device = "cpu", directory: str | os.PathLike | None = None,
                  progress: bool = True, model: VisionTransformer | None = None) -> TokenSet:
    """Tokens of one block (None = last block after the final norm), from the cache or extracted and cached."""
    return cached_blocks(backbone, dataset, [block], norm, batch_size, device, directory, progress, model)[0]
