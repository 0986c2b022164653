"""The token cache's entries: run a backbone once over a dataset and keep its output tokens on disk.

A cache entry is one file (`store`) holding the tokens (float16), the labels and, in its
metadata, the key that produced it (`keys`), the token layout and a checksum. Memory does not
grow with the number of images: extraction (`extraction`) streams each batch's tokens straight into
the entry file being built, a loaded entry maps its file, and `TokenSet.mean_patches` converts a few
images at a time. `pooled_features` keeps only the [cls] token and the mean of the patch tokens
(float32, (N, D)), computed batch by batch, in a small entry of its own.

On load the checksum is verified: a truncated or changed entry is extracted again, with one line
saying so; an intact entry whose stored key differs from the request is refused with a sentence
naming the file. An extraction killed at any moment leaves nothing a later run would load. When the
disk refuses the file halfway, the tokens are kept in memory and returned, with one line saying they
were not stored. Processes filling one entry at once take turns (`locks`): one extracts, the
others wait and then load its entry.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import Dataset

from ..checks import SelaggError, notice, whole_number
from ..extraction import (
    ExtractOptions,
    TokenSink,
    check_extraction_inputs,
    compute_precision,
    extract_blocks,
    filled,
    images_per_chunk,
    loader_workers,
    resolved_options,
    token_batches,
)
from ..models import TokenLayout, load_backbone, token_layout
from .files import remove_orphaned_temporaries
from .keys import (
    CACHE_ENV,
    backbone_identity,
    check_disk_space,
    dataset_identity,
    entry_key,
    entry_path,
    key_text,
    pooled_entry_bytes,
    pooled_key,
    token_entry_bytes,
    token_shape,
    writable_cache_dir,
)
from .locks import entries_locked, remove_stale_locks
from .store import DamagedEntry, EntryFile, UnreadableEntry, read_entry

__all__ = ["block_entries", "pooled_entry"]


# ----------------------------------------------------------------------------- entries of tokens
def token_meta(key: dict, layout: TokenLayout) -> dict[str, str]:
    """An entry's metadata before its checksum: the key and the token layout."""
    return {"key": key_text(key), "num_prefix_tokens": str(layout.num_prefix_tokens),
            "has_cls": str(int(layout.has_cls)), "grid_size": json.dumps(list(layout.grid_size))}


def stored_layout(meta: dict[str, str]) -> TokenLayout:
    """The token layout an entry's metadata records."""
    has_cls, prefix = bool(int(meta["has_cls"])), int(meta["num_prefix_tokens"])
    return TokenLayout(has_cls, prefix - int(has_cls), tuple(json.loads(meta["grid_size"])))


def save_entry(path: Path, tokens) -> None:
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


def load_entry(path: Path, key: dict) -> dict:
    """Read a verified entry of tokens, and refuse it when its stored key is not the requested one."""
    state, meta = verified_state(path, key)
    check_names(state, {"tokens", "labels"})
    return dict(tokens=state["tokens"], labels=state["labels"], layout=stored_layout(meta), key=key)


def load_pooled(path: Path, key: dict) -> dict:
    """Read a verified pooled entry, and refuse it when its stored key is not the requested one."""
    state, meta = verified_state(path, key)
    check_names(state, {"labels", "mean"} | ({"cls"} if meta.get("has_cls") == "1" else set()))
    return dict(cls=state.get("cls"), mean=state["mean"], labels=state["labels"], key=key)


def loaded_entry(path: Path, key: dict, quiet: bool = False,
                 load: Callable[[Path, dict], dict] = load_entry) -> dict | None:
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


def block_entries(backbone: str | os.PathLike, dataset: Dataset, blocks: list[int | None] | None = None,
                  options: ExtractOptions | None = None, *, directory: str | os.PathLike | None = None,
                  model: VisionTransformer | None = None, data_key: str | None = None) -> list[dict]:
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

    def extract(missing: list[int], folder: Path) -> list[dict]:
        net = model if model is not None else load_backbone(backbone, device=options.device)
        check_disk_space(folder, len(missing) * token_entry_bytes(len(dataset), *token_shape(net)))
        layout = token_layout(net)
        sinks = [EntrySink(paths[i], token_meta(keys[i], layout), len(dataset)) for i in missing]
        tokens, labels = extract_blocks(net, dataset, [blocks[i] for i in missing], options, into=sinks)
        return [dict(tokens=t, labels=labels, layout=layout, key=keys[i]) for i, t in zip(missing, tokens)]

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


def pooled_entry(backbone: str | os.PathLike, dataset: Dataset, block: int | None = None,
                    options: ExtractOptions | None = None, *, directory: str | os.PathLike | None = None,
                    model: VisionTransformer | None = None, data_key: str | None = None) -> dict:
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

    def extract(missing: list[int], folder: Path) -> list[dict]:
        net = model if model is not None else load_backbone(backbone, device=options.device)
        layout = token_layout(net)
        check_disk_space(folder, pooled_entry_bytes(len(dataset), token_shape(net)[1], layout.has_cls))
        meta = token_meta(key, layout)
        sink = EntrySink(path, meta, len(dataset), what="pooled features")
        held = extract_pooled(net, dataset, block, options, into=sink)
        return [dict(cls=held.get("cls"), mean=held["mean"], labels=held["labels"], key=key)]

    return cached_entries([path], [key], directory, extract, load=load_pooled)[0]


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


def float16_options(options: ExtractOptions | None, where: str) -> ExtractOptions:
    """The options resolved, refusing a dtype other than float16 for a place (`where`) that keeps float16 tokens."""
    options = resolved_options(options)
    if options.dtype != torch.float16:
        raise SelaggError(f"{where} keeps float16 tokens, so options.dtype={options.dtype} cannot be honoured; leave "
                          "ExtractOptions.dtype at torch.float16, or call extraction.extract_blocks for tokens in "
                          "another dtype.")
    return options



def pooled_rows(tokens: torch.Tensor, labels: torch.Tensor, layout: TokenLayout) -> dict[str, torch.Tensor]:
    """One batch's pooled features: [cls] (if any) and the mean of the patch tokens, float32, and labels."""
    rows = {"labels": labels, "mean": tokens[:, layout.num_prefix_tokens:].float().mean(1)}
    if layout.has_cls:
        rows["cls"] = tokens[:, 0].float()
    return rows



def extract_pooled(model: VisionTransformer, dataset: Dataset, block: int | None = None,
                   options: ExtractOptions = ExtractOptions(), into: TokenSink | None = None) -> dict[str, torch.Tensor]:
    """[cls] ('cls', only for a model with one), mean of the patch tokens ('mean'), (N, D) float32, and 'labels'.

    Pooled from the float16 tokens batch by batch (the same numbers as `TokenSet.cls` and `.mean_patches`
    of the cached tokens), without keeping any tokens; `options.dtype` is not used.
    """
    layout = token_layout(model)
    sink = into if into is not None else TokenSink()
    batches = token_batches(model, dataset, [block], replace(options, dtype=torch.float16))
    return filled([sink], ([pooled_rows(tokens[0], labels, layout)] for tokens, labels in batches))[0]
