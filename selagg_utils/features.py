"""Frozen tokens: `TokenSet`, the tokens of one split, and `split_tokens`, which gets them.

A `TokenSet` holds the output tokens of a frozen backbone for every image of a split, (N, T, D) in
float16 with the prefix tokens ([cls], registers) first, their labels and their `TokenLayout`. The
chapters pool them (`.cls`, `.mean_patches`, `.patches`) and train heads on them. The tokens come
from `extraction` (forward passes) and are kept on disk by the token cache, the engine room
`selagg_utils.cache`; this module is its one door: `split_tokens`, `cached_tokens`, `cached_blocks`,
`pooled_features` and `cache_file` are the only calls into it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .checks import SelaggError
from .data import load_split
from .extraction import ExtractOptions, images_per_chunk
from .models import TokenLayout, data_config

__all__ = ["TokenSet", "PooledFeatures", "split_tokens", "cached_tokens", "cached_blocks", "pooled_features", "cache_file"]


# ----------------------------------------------------------------------------- tokens of one split
@dataclass
class TokenSet:
    """Cached tokens of one split: tokens (N, T, D) float16 with prefix tokens first, labels (N,), their layout."""

    tokens: torch.Tensor
    labels: torch.Tensor
    layout: TokenLayout
    key: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuse tokens and a layout that disagree, which would pool or label the wrong tokens."""
        tokens, labels = self.tokens, self.labels
        if not (isinstance(tokens, torch.Tensor) and tokens.ndim == 3 and isinstance(labels, torch.Tensor)
                and labels.ndim == 1 and len(labels) == len(tokens)):
            raise SelaggError("A TokenSet needs tokens of shape (images, tokens, width) and one label per image, "
                              f"got tokens {tuple(getattr(self.tokens, 'shape', ()))} and labels "
                              f"{tuple(getattr(self.labels, 'shape', ()))}; pass what extract_blocks returns.")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise SelaggError(f"A TokenSet's labels are class indices of an integer dtype, got {labels.dtype}; pass "
                              "labels.long() when they are whole numbers (a float label would be rounded silently).")
        if not isinstance(self.layout, TokenLayout):
            raise SelaggError(f"A TokenSet's layout is a models.TokenLayout, got a {type(self.layout).__name__}; "
                              "read it from the backbone with models.token_layout(model).")
        if self.layout.num_tokens != tokens.shape[1]:
            raise SelaggError(f"The patch grid {self.layout.grid_size} does not hold the "
                              f"{tokens.shape[1] - self.layout.num_prefix_tokens} patch tokens that follow "
                              f"{self.layout.num_prefix_tokens} prefix tokens; pass the backbone's layout "
                              "(models.token_layout(model)).")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_prefix_tokens(self) -> int:
        return self.layout.num_prefix_tokens

    @property
    def has_cls(self) -> bool:
        return self.layout.has_cls

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.layout.grid_size

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
        return remember_source(self.tokens[:, 0].float(), self.key)

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
        return remember_source(out, self.key)

    def subset(self, index: torch.Tensor) -> "TokenSet":
        """The same tokens restricted to some images."""
        return TokenSet(self.tokens[index], self.labels[index], self.layout, {**self.key, "subset": True})


def remember_source(tensor: torch.Tensor, key: dict) -> torch.Tensor:
    """`tensor`, marked as made by what `key` names, so that evaluations on features can refuse splits of two
    backbones (what a key names is the cache's to read: `cache.keys.key_source`)."""
    from .cache.keys import key_source

    tensor.selagg_source = key_source(key)
    return tensor


def source_of(item) -> dict | None:
    """What made a TokenSet's or PooledFeatures' tokens, or a feature tensor taken from one; None when unknown."""
    if isinstance(item, (TokenSet, PooledFeatures)):
        from .cache.keys import key_source

        return key_source(item.key)
    return getattr(item, "selagg_source", None) if isinstance(item, torch.Tensor) else None


def check_same_source(splits: dict, what: str = "tokens") -> None:
    """Refuse splits (TokenSets, PooledFeatures or feature tensors taken from them) whose tokens come from
    different weights or blocks: a probe trained on one backbone and scored on another prints a number that means
    nothing."""
    named = [(name, source) for name, source in ((n, source_of(t)) for n, t in splits.items()) if source is not None]
    for name, source in named[1:]:
        first, ref = named[0]
        if source != ref:
            def said(s: dict) -> str:
                return f"{s['weights'].get('backbone', 'a backbone')!r} (block {s['block']})"
            differ = said(source) if said(source) != said(ref) else f"other weights of {said(source)}"
            raise SelaggError(f"The {name} split's {what} come from {differ}, the {first} split's from {said(ref)}; "
                              "every split of a probe must come from one backbone and block: extract them all "
                              "with the same backbone name and block.")


@dataclass(frozen=True)
class PooledFeatures:
    """Pooled features of one split: [cls] (N, D) float32 (None without one), mean of the patches (N, D), labels."""

    cls: torch.Tensor | None
    mean: torch.Tensor
    labels: torch.Tensor
    key: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for features in (self.cls, self.mean):
            if isinstance(features, torch.Tensor):
                remember_source(features, self.key)

    def __len__(self) -> int:
        return len(self.labels)


def split_tokens(settings, name: str, split: str, device: str | torch.device | None = None) -> TokenSet:
    """Last-block tokens of backbone `name` on one split of a scale's dataset (a config.ScaleSettings)."""
    dataset = load_split(settings, split, data_config(name))  # images as the checkpoint expects them
    options = ExtractOptions(batch_size=settings.batch_size, device=device)  # device None: this process's
    return cached_tokens(name, dataset, options=options)  # from the cache, or extracted once and cached


def cached_tokens(backbone: str | os.PathLike, dataset: Dataset, block: int | None = None,
                  options: ExtractOptions | None = None, **where) -> TokenSet:
    """Tokens of one block (None = last block after the final norm), from the cache or extracted and cached.

    `where` passes the cache's keywords through: `directory`, `model` (weights instead of the name's),
    `data_key` (see `cache.entries.block_entries`).
    """
    return cached_blocks(backbone, dataset, [block], options, **where)[0]


def cached_blocks(backbone: str | os.PathLike, dataset: Dataset, blocks: list[int | None] | None = None,
                  options: ExtractOptions | None = None, **where) -> list[TokenSet]:
    """Tokens after each block (None = the last, after the final norm), extracting only what is not cached."""
    from .cache.entries import block_entries

    return [TokenSet(**entry) for entry in block_entries(backbone, dataset, blocks, options, **where)]


def pooled_features(backbone: str | os.PathLike, dataset: Dataset, block: int | None = None,
                    options: ExtractOptions | None = None, **where) -> PooledFeatures:
    """[cls] (None without one) and mean of the patch tokens, (N, D) float32, and labels: cached, never the tokens."""
    from .cache.entries import pooled_entry

    return PooledFeatures(**pooled_entry(backbone, dataset, block, options, **where))


def cache_file(tokens: TokenSet) -> Path:
    """The cache file that holds these tokens (where `cached_tokens` stored or found them)."""
    from .cache.keys import entry_path

    return entry_path(tokens.key)
