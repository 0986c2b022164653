"""Frozen tokens: run a backbone once over a dataset and keep its output tokens, cached on disk.

A cache entry is one file (`token_store`) holding the tokens (float16), the labels and, in its
metadata, the key that produced it (`cache_keys`), the token layout and a checksum. Memory does not
grow with the number of images: extraction (`extraction`) streams each batch's tokens straight into
the entry file being built, a loaded entry maps its file, and `TokenSet.mean_patches` converts a few
images at a time. `pooled_features` keeps only the [cls] token and the mean of the patch tokens
(float32, (N, D)), computed batch by batch, in a small entry of its own.

On load the checksum is verified: a truncated or changed entry is extracted again, with one line
saying so; an intact entry whose stored key differs from the request is refused with a sentence
naming the file. An extraction killed at any moment leaves nothing a later run would load. When the
disk refuses the file halfway, the tokens are kept in memory and returned, with one line saying they
were not stored. Processes filling one entry at once take turns (`entry_locks`): one extracts, the
others wait and then load its entry.
"""
from __future__ import annotations

import json
import math
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import Dataset

from .cache_keys import (CACHE_ENV, backbone_identity, check_disk_space, dataset_identity, entry_key, entry_path,
                         key_text, pooled_entry_bytes, pooled_key, token_entry_bytes, token_shape,
                         writable_cache_dir)
from .checkpoints import remove_orphaned_temporaries
from .checks import notice, whole_number
from .data import load_split
from .entry_locks import entries_locked, remove_stale_locks
from .errors import SelaggError
from .extraction import (EntrySink, ExtractOptions, check_extraction_inputs, compute_precision, extract_blocks,
                         extract_pooled, float16_options, loader_workers)
from .models import TokenLayout, data_config, load_backbone, token_layout
from .token_store import DamagedEntry, EntryFile, UnreadableEntry, read_entry

__all__ = ["TokenSet", "key_source", "remember_source", "source_of", "check_same_source", "PooledFeatures",
           "split_tokens", "cached_tokens", "cached_blocks", "pooled_features",
           "save_entry", "load_entry", "token_meta", "stored_layout", "CHUNK_BYTES"]

#: `TokenSet.mean_patches` converts this many bytes of float32 tokens at a time.
CHUNK_BYTES = 64 << 20


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


#: The fields of a cache key or store identity that describe the data, not what made the tokens from it.
_DATA_FIELDS = frozenset({"format", "code", "data", "transform", "block", "norm", "dtype", "compute", "pooled",
                          "subset", "store", "part", "parts", "split", "dataset"})


def key_source(key: dict) -> dict | None:
    """What made tokens from their images, read from their key (a cache key or a store identity): the weights'
    identity, the block and the final norm; None for a key that names no backbone (tokens built by hand)."""
    key = json.loads(json.dumps(key, sort_keys=True, default=str))
    if "backbone" not in key:  # tokens built by hand, or a key of the caller's own
        return None
    weights = key["backbone"] if isinstance(key["backbone"], dict) else \
        {k: v for k, v in key.items() if k not in _DATA_FIELDS}
    return {"weights": weights, "block": key.get("block"), "norm": key.get("norm")}


#: The source of each feature tensor handed out by `TokenSet.cls`, `.mean_patches` and `PooledFeatures`, by id.
_SOURCES: dict[int, tuple[weakref.ref, dict]] = {}


def remember_source(tensor: torch.Tensor, key: dict) -> torch.Tensor:
    """`tensor`, remembered (while it lives) as made by what `key` names, so that evaluations on features can
    refuse splits of two backbones."""
    source = key_source(key)
    if source is not None:
        _SOURCES[id(tensor)] = (weakref.ref(tensor, lambda _, i=id(tensor): _SOURCES.pop(i, None)), source)
    return tensor


def source_of(item) -> dict | None:
    """What made a TokenSet's or PooledFeatures' tokens, or a feature tensor taken from one; None when unknown."""
    if isinstance(item, (TokenSet, PooledFeatures)):
        return key_source(item.key)
    entry = _SOURCES.get(id(item)) if isinstance(item, torch.Tensor) else None
    return entry[1] if entry is not None and entry[0]() is item else None


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

    def __post_init__(self) -> None:
        for features in (self.cls, self.mean):
            if isinstance(features, torch.Tensor):
                remember_source(features, self.key)

    def __len__(self) -> int:
        return len(self.labels)


# ----------------------------------------------------------------------------- entries of tokens
def token_meta(key: dict, layout: TokenLayout) -> dict[str, str]:
    """An entry's metadata before its checksum: the key and the token layout."""
    return {"key": key_text(key), "num_prefix_tokens": str(layout.num_prefix_tokens),
            "has_cls": str(int(layout.has_cls)), "grid_size": json.dumps(list(layout.grid_size))}


def stored_layout(meta: dict[str, str]) -> TokenLayout:
    """The token layout an entry's metadata records."""
    has_cls, prefix = bool(int(meta["has_cls"])), int(meta["num_prefix_tokens"])
    return TokenLayout(has_cls, prefix - int(has_cls), tuple(json.loads(meta["grid_size"])))


def save_entry(path: Path, tokens: TokenSet) -> None:
    """Write one entry of tokens already at hand, a chunk of images at a time, through a temporary file."""
    meta = token_meta(tokens.key, tokens.layout)
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
    return TokenSet(state["tokens"], state["labels"], stored_layout(meta), key)


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
    except UnreadableEntry as err:
        if not quiet:
            notice(f"The cache entry {path} cannot be read by this user ({err}); extracting its tokens again (its "
                   f"owner can share it: chmod g+r {path}, in a folder of the group).")
        return None
    except DamagedEntry as err:
        if not quiet:
            notice(f"The cache entry {path} is damaged ({err}); extracting its tokens again.")
        return None


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
                  options: ExtractOptions | None = None, *, directory: str | os.PathLike | None = None,
                  model: VisionTransformer | None = None, data_key: str | None = None) -> list[TokenSet]:
    """Tokens after each block (None = the last block, after the final norm), extracting only what is not cached.

    `options` (None: `ExtractOptions()`) say how the backbone runs; the cache keeps float16 tokens, so
    another `options.dtype` is refused. `model` replaces the weights `backbone` names (the key then
    holds the digest of its weights); `data_key` names the dataset's content when the caller wants to
    skip digesting it.
    """
    options = checked_options(options, dataset)
    blocks = checked_blocks([None] if blocks is None else list(blocks))
    identity = {**backbone_identity(backbone, model), **dataset_identity(dataset, data_key)}
    compute = compute_precision(options.device)
    keys = [entry_key(identity, "last" if b is None else b, True if b is None else options.norm, compute)
            for b in blocks]
    paths = [entry_path(k, directory) for k in keys]

    def extract(missing: list[int], folder: Path) -> list[TokenSet]:
        net = model if model is not None else load_backbone(backbone, device=options.device)
        check_disk_space(folder, len(missing) * token_entry_bytes(len(dataset), *token_shape(net)))
        layout = token_layout(net)
        sinks = [EntrySink(paths[i], token_meta(keys[i], layout), len(dataset)) for i in missing]
        tokens, labels = extract_blocks(net, dataset, [blocks[i] for i in missing], options, into=sinks)
        return [TokenSet(t, labels, layout, keys[i]) for i, t in zip(missing, tokens)]

    return cached_entries(paths, keys, directory, extract)


def checked_options(options: ExtractOptions | None, dataset: Dataset) -> ExtractOptions:
    """The cache's options resolved (device included), checked with the dataset before any work."""
    options = float16_options(options, "The feature cache")
    check_extraction_inputs(dataset, options.batch_size)
    loader_workers(options.num_workers, options.device)
    return options


def checked_blocks(blocks: list) -> list[int | None]:
    """The blocks when each is a whole number or None (the options passed where a block goes, say, refused)."""
    for b in blocks:
        if b is not None:
            whole_number(b, "block", 1, "pass a block number (1 = the first), None for the last block after the "
                                        "final norm, and the extraction options as options=ExtractOptions(...)")
    return blocks


def cached_tokens(backbone: str | os.PathLike, dataset: Dataset, block: int | None = None,
                  options: ExtractOptions | None = None, *, directory: str | os.PathLike | None = None,
                  model: VisionTransformer | None = None, data_key: str | None = None) -> TokenSet:
    """Tokens of one block (None = last block after the final norm), from the cache or extracted and cached."""
    return cached_blocks(backbone, dataset, [block], options, directory=directory, model=model,
                         data_key=data_key)[0]


def split_tokens(settings, name: str, split: str, device: str | torch.device | None = None) -> TokenSet:
    """Last-block tokens of backbone `name` on one split of a scale's dataset (a config.ScaleSettings), with the
    images read as the backbone's checkpoint expects them: from the cache, extracted on first use (device None:
    this process's)."""
    dataset = load_split(settings, split, data_config(name))
    return cached_tokens(name, dataset, options=ExtractOptions(batch_size=settings.batch_size, device=device))


def pooled_features(backbone: str | os.PathLike, dataset: Dataset, block: int | None = None,
                    options: ExtractOptions | None = None, *, directory: str | os.PathLike | None = None,
                    model: VisionTransformer | None = None, data_key: str | None = None) -> PooledFeatures:
    """[cls] (None without one) and mean of the patch tokens, (N, D) float32, and labels: cached, never the tokens.

    The patch mean leaves out the [cls] and register tokens (the model's `num_prefix_tokens`); both
    are pooled from the float16 tokens, so they equal `.cls` and `.mean_patches` of `cached_tokens`
    (another `options.dtype` is refused).
    """
    options = checked_options(options, dataset)
    checked_blocks([block])
    identity = {**backbone_identity(backbone, model), **dataset_identity(dataset, data_key)}
    key = pooled_key(identity, "last" if block is None else block, True if block is None else options.norm,
                     compute_precision(options.device))
    path = entry_path(key, directory)

    def extract(missing: list[int], folder: Path) -> list[PooledFeatures]:
        net = model if model is not None else load_backbone(backbone, device=options.device)
        layout = token_layout(net)
        check_disk_space(folder, pooled_entry_bytes(len(dataset), token_shape(net)[1], layout.has_cls))
        meta = token_meta(key, layout)
        sink = EntrySink(path, meta, len(dataset), what="pooled features")
        held = extract_pooled(net, dataset, block, options, into=sink)
        return [PooledFeatures(held.get("cls"), held["mean"], held["labels"], key)]

    return cached_entries([path], [key], directory, extract, load=load_pooled)[0]
