"""Forward passes to tokens: a backbone run over a dataset, batch by batch, in order.

`token_batches` yields each batch's tokens after the requested blocks, in float16 on the CPU,
checked to be finite; the forward pass runs under `torch.autocast` with the device's half
precision (bfloat16 where native, float16 on other CUDA GPUs, none on a CPU), which the cache key
records (`compute_precision`). `extract_blocks` and `extract_pooled` feed the batches to an
`EntrySink`: straight into an entry file being built (memory does not grow with the number of
images), or into memory when the disk refuses the file, with one line saying so.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, Dataset

from .checks import check_finite_items, notice, options_object, whole_number, whole_number_fields
from .devices import half_dtype, resolve_device
from .distributed import current_process
from .errors import SelaggError
from .models import TokenLayout, check_images_fit, token_layout
from .progress import progress_bar
from .token_store import EntryFile

__all__ = ["EXTRACTION_VERSION", "ExtractOptions", "process_device", "resolved_options", "float16_options",
           "extract_tokens",
           "extract_blocks", "extract_pooled", "token_batches", "tokens_after", "block_tokens", "compute_precision",
           "loader_workers", "check_extraction_inputs", "EntrySink", "pooled_rows"]

_REPAIR = "remove or repair it, or pass a dataset without it"

#: The version of the code that turns images into tokens (image decoding, forward pass, kept dtype); part of every
#: cache key and store identity, and raised whenever a change to that code may change a token.
EXTRACTION_VERSION = 2


@dataclass(frozen=True)
class ExtractOptions:
    """How a backbone runs over a dataset: images per forward pass, the device (None: this process's, see
    `process_device`), whether the last block's tokens go through the final norm, a progress bar, the dtype the
    tokens are kept in, and loader processes (None: 0 on a CPU, up to 4 on CUDA)."""

    batch_size: int = 256
    device: str | torch.device | None = None
    norm: bool = True
    progress: bool = True
    dtype: torch.dtype = torch.float16
    num_workers: int | None = None

    def __post_init__(self) -> None:
        """Refuse a batch size, loader count or token dtype no extraction could run with, before any work."""
        whole_number_fields(self, {"batch_size": (1, "pass the number of images per forward pass, e.g. 256")})
        if self.num_workers is not None:
            loader_workers(self.num_workers, "cpu")
        if self.device is not None:
            resolve_device(self.device)  # a device this machine lacks is refused here, not deep in the first batch
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise SelaggError(f"dtype={self.dtype!r} is not accepted: tokens are kept in a floating torch dtype, "
                              "e.g. torch.float16 (the cache's) or torch.float32.")


def process_device(device: str | torch.device | None = None) -> str | torch.device:
    """`device`, or this process's when None (`distributed.current_process`: the CPU outside torchrun,
    cuda:LOCAL_RANK under NCCL); the one place a device None is resolved."""
    return current_process().device if device is None else device


def resolved_options(options: ExtractOptions | None = None) -> ExtractOptions:
    """The options to run with: ExtractOptions() for None, and device None replaced by this process's device."""
    options = options_object(options, ExtractOptions, "options", "ExtractOptions(batch_size=64, progress=False)",
                             ExtractOptions())
    return options if options.device is not None else replace(options, device=process_device())


def float16_options(options: ExtractOptions | None, where: str) -> ExtractOptions:
    """The options resolved, refusing a dtype other than float16 for a place (`where`) that keeps float16 tokens."""
    options = resolved_options(options)
    if options.dtype != torch.float16:
        raise SelaggError(f"{where} keeps float16 tokens, so options.dtype={options.dtype} cannot be honoured; leave "
                          "ExtractOptions.dtype at torch.float16, or call extraction.extract_blocks for tokens in "
                          "another dtype.")
    return options


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
        check_images_fit(model, images)
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


def compute_precision(device: str | torch.device) -> str:
    """How the forward pass computes on a device: 'float32', or e.g. 'bfloat16 autocast' (part of the key)."""
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
def token_batches(model: VisionTransformer, dataset: Dataset, blocks: list[int | None],
                  options: ExtractOptions = ExtractOptions()) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """Each batch's ([tokens (B, T, D) in `options.dtype` on the CPU per block], labels (B,)), checked to be finite.

    The forward pass runs under `torch.autocast` with the device's half precision (none on a CPU).
    """
    options = resolved_options(options)
    batch_size, device, dtype = options.batch_size, options.device, options.dtype
    check_extraction_inputs(dataset, batch_size)
    model.eval().to(device)
    half = half_dtype(device)
    done = 0
    loader = extraction_loader(dataset, batch_size, device, options.num_workers)
    for batch in progress_bar(loader, enabled=options.progress, desc="extracting tokens", leave=False):
        check_finite_items(batch[0], "Image", done, _REPAIR)
        if not done:
            check_images_fit(model, batch[0])
        with torch.autocast(torch.device(device).type, dtype=half) if half is not None else nullcontext():
            per_block = tokens_after(model, batch[0].to(device, non_blocking=True), blocks, options.norm)
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


def extract_blocks(model: VisionTransformer, dataset: Dataset, blocks: list[int | None],
                   options: ExtractOptions = ExtractOptions(),
                   into: list[EntrySink] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Tokens after several blocks in one pass over the data: ([(N, T, D)] per block, labels (N,)).

    With `into` (one sink per block), each batch goes straight into that block's entry file and the
    tokens returned map the finished file; without it they are gathered in memory.
    """
    sinks = into if into is not None else [EntrySink(None, {}, len(dataset)) for _ in blocks]
    batches = token_batches(model, dataset, blocks, options)
    held = filled(sinks, ([{"labels": labels, "tokens": t} for t in tokens] for tokens, labels in batches))
    return [h["tokens"] for h in held], held[0]["labels"]


def pooled_rows(tokens: torch.Tensor, labels: torch.Tensor, layout: TokenLayout) -> dict[str, torch.Tensor]:
    """One batch's pooled features: [cls] (if any) and the mean of the patch tokens, float32, and labels."""
    rows = {"labels": labels, "mean": tokens[:, layout.num_prefix_tokens:].float().mean(1)}
    if layout.has_cls:
        rows["cls"] = tokens[:, 0].float()
    return rows


def extract_pooled(model: VisionTransformer, dataset: Dataset, block: int | None = None,
                   options: ExtractOptions = ExtractOptions(), into: EntrySink | None = None) -> dict[str, torch.Tensor]:
    """[cls] ('cls', only for a model with one), mean of the patch tokens ('mean'), (N, D) float32, and 'labels'.

    Pooled from the float16 tokens batch by batch (the same numbers as `TokenSet.cls` and `.mean_patches`
    of the cached tokens), without keeping any tokens; `options.dtype` is not used.
    """
    layout = token_layout(model)
    sink = into if into is not None else EntrySink(None, {}, len(dataset))
    batches = token_batches(model, dataset, [block], replace(options, dtype=torch.float16))
    return filled([sink], ([pooled_rows(tokens[0], labels, layout)] for tokens, labels in batches))[0]


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
