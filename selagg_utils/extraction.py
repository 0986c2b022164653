"""Forward passes to tokens: a backbone run over a dataset, batch by batch, in order.

`token_batches` yields each batch's tokens after the requested blocks, in float16 on the CPU,
checked to be finite; the forward pass runs under `torch.autocast` with the device's half
precision (bfloat16 where native, float16 on other CUDA GPUs, none on a CPU), which the cache key
records (`compute_precision`). `extract_blocks` and `extract_pooled` feed the batches to an
`EntrySink`: straight into an entry file being built (memory does not grow with the number of
images), or into memory when the disk refuses the file, with one line saying so.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, Dataset

from .checks import SelaggError, check_finite_items, options_object, whole_number, whole_number_fields
from .config import half_dtype, process_device, progress_bar, resolve_device
from .models import check_images_fit

__all__ = ["ExtractOptions", "extract_blocks"]

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


def resolved_options(options: ExtractOptions | None = None) -> ExtractOptions:
    """The options to run with: ExtractOptions() for None, and device None replaced by this process's device."""
    options = options_object(options, ExtractOptions, "options", "ExtractOptions(batch_size=64, progress=False)",
                             ExtractOptions())
    return options if options.device is not None else replace(options, device=process_device())


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


class TokenSink:
    """Where one block's rows go during extraction: memory. The token cache passes sinks of the same three
    methods that stream into an entry file instead (`cache.entries.EntrySink`)."""

    def __init__(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {}

    def add(self, rows: dict[str, torch.Tensor]) -> None:
        """Take one batch's rows (one tensor per name, each with the batch's images first)."""
        for name, t in rows.items():
            self.parts.setdefault(name, []).append(t)

    def result(self) -> dict[str, torch.Tensor]:
        """The rows of every batch, joined."""
        return {name: torch.cat(parts) for name, parts in self.parts.items()}

    def discard(self) -> None:
        """Drop what was kept (an extraction that failed)."""
        self.parts.clear()


def filled(sinks: list[TokenSink], batches: Iterator[list[dict[str, torch.Tensor]]]) -> list[dict[str, torch.Tensor]]:
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
                   into: list[TokenSink] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Tokens after several blocks in one pass over the data: ([(N, T, D)] per block, labels (N,)).

    With `into` (one sink per block), each batch goes straight into that block's entry file and the
    tokens returned map the finished file; without it they are gathered in memory.
    """
    sinks = into if into is not None else [TokenSink() for _ in blocks]
    batches = token_batches(model, dataset, blocks, options)
    held = filled(sinks, ([{"labels": labels, "tokens": t} for t in tokens] for tokens, labels in batches))
    return [h["tokens"] for h in held], held[0]["labels"]


#: `TokenSet.mean_patches` converts this many bytes of float32 tokens at a time.
CHUNK_BYTES = 64 << 20


def images_per_chunk(tokens: torch.Tensor) -> int:
    """How many images of (N, T, D) tokens fit in CHUNK_BYTES once converted to float32 (at least one)."""
    return max(1, CHUNK_BYTES // max(1, 4 * math.prod(tokens.shape[1:])))
