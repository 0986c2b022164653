"""Attention of timm ViTs: capture per block and head, and the paper's uniformity statistics streamed over a dataset.

Capture works on timm's standard `Attention` module: with `fused_attn` off it computes the
probabilities explicitly and passes them through `attn_drop`, where a forward hook reads them
(the same place `timm.utils.AttentionExtract` hooks). Fused attention is switched off only while
capturing and restored afterwards, so plain forward passes keep the fast fused kernel.
Statistics are reduced batch by batch inside the hooks: no attention map outlives its block.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from . import config
from .checks import SelaggError, all_finite, check_finite_items
from .config import progress_bar
from .models import TokenLayout, check_images_fit, token_layout

__all__ = ["unfused_attention", "attention_hooks", "attention_maps", "renormalised_entropy",
           "batch_statistics", "attention_statistics"]

#: Every statistic `attention_statistics` can return, with what it measures (per block; per head where it has one).
STATISTICS: dict[str, str] = {
    "cls_self": "[cls] self-attention A[cls, cls]",
    "cls_to_patch": "[cls]→patch attention mass, sum over patches of A[cls, j]",
    "cls_patch_entropy": "[cls]→patch entropy (nats), over patches renormalised",
    "cls_patch_entropy_norm": "[cls]→patch entropy / ln N (1 = uniform)",
    "cls_object_share": "share of [cls]→patch attention on the object's patches",
    "patch_self": "patch self-attention, mean over patches of A[i, i]",
    "patch_to_cls": "patch→[cls] attention, mean over patches of A[i, cls]",
    "patch_to_registers": "patch→register attention mass, mean over patches",
    "patch_patch_entropy": "patch→patch entropy (nats), mean over patch queries",
    "patch_patch_entropy_norm": "patch→patch entropy / ln N (1 = uniform)",
    "cls_residual_ratio": "||attention branch|| / ||block input|| for [cls]",
    "patch_residual_ratio": "||attention branch|| / ||block input||, mean over patches",
}
#: Statistics that belong to a block as a whole (no head dimension).
BLOCK_ONLY = ("cls_residual_ratio", "patch_residual_ratio")
_ROW_SUM_TOLERANCE = 2e-2  # bf16 probabilities sum to 1 only to about 1e-2


# ----------------------------------------------------------------------------- capture
def check_vit(model: nn.Module) -> VisionTransformer:
    """The model itself if it is a timm VisionTransformer, else a clear error."""
    if not isinstance(model, VisionTransformer):
        raise SelaggError(f"Attention can be measured on a timm VisionTransformer, not on a {type(model).__name__}; "
                          "build the backbone with selagg_utils.models.load_backbone or timm.create_model('vit_...').")
    return model


def attention_modules(model: VisionTransformer) -> list[nn.Module]:
    """Each block's attention module, checked to be one whose probabilities can be captured."""
    check_vit(model)
    modules = []
    for i, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, Attention):
            kind = type(attn).__name__ if isinstance(attn, nn.Module) else "no `attn` module"
            raise SelaggError(f"Block {i} ({type(block).__name__}) has {kind} instead of timm's standard Attention, "
                              "so its softmax probabilities cannot be captured; use a ViT built from timm's Block "
                              "and Attention (the default of timm's VisionTransformer).")
        modules.append(attn)
    return modules


@contextmanager
def unfused_attention(model: VisionTransformer) -> Iterator[None]:
    """Switch every attention module to the explicit softmax path, and restore each `fused_attn` afterwards."""
    modules = attention_modules(model)
    saved = [m.fused_attn for m in modules]
    try:
        for m in modules:
            m.fused_attn = False
        yield
    finally:
        for m, fused in zip(modules, saved):
            m.fused_attn = fused


@contextmanager
def attention_hooks(model: VisionTransformer, on_attention: Callable[[int, torch.Tensor], None],
                    on_residual: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> Iterator[None]:
    """Call on_attention(block, probs (B,H,T,T)) and on_residual(block, input, branch) during forward passes."""
    modules = attention_modules(model)
    inputs: dict[int, torch.Tensor] = {}
    with ExitStack() as stack:
        stack.enter_context(unfused_attention(model))
        for i, (block, attn) in enumerate(zip(model.blocks, modules)):
            handles = [attn.attn_drop.register_forward_hook(lambda _m, args, _out, i=i: on_attention(i, args[0]))]
            branch = getattr(block, "ls1", None)
            if on_residual is not None and isinstance(branch, nn.Module):
                handles.append(block.register_forward_pre_hook(lambda _m, args, i=i: inputs.__setitem__(i, args[0])))
                handles.append(branch.register_forward_hook(
                    lambda _m, _args, out, i=i: on_residual(i, inputs.pop(i), out)))
            for h in handles:
                stack.callback(h.remove)
        yield


def _check_probabilities(block: int, probs: torch.Tensor, num_tokens: int, num_heads: int) -> None:
    """A clear error when what reached `attn_drop` is not a (B, heads, T, T) row-stochastic tensor."""
    if probs.ndim != 4 or tuple(probs.shape[1:]) != (num_heads, num_tokens, num_tokens):
        raise SelaggError(f"Block {block} passed a tensor of shape {tuple(probs.shape)} through attn_drop, not "
                          f"attention of shape (batch, {num_heads}, {num_tokens}, {num_tokens}); this attention "
                          "module is not supported.")
    if not all_finite(probs):
        raise SelaggError(f"Block {block} produced NaN or infinite attention from finite images, so the backbone "
                          "overflowed or holds non-finite weights; run it in float32 (autocast=False) or check its "
                          "weights.")
    err = float((probs.float().sum(-1) - 1).abs().max())
    if not err <= _ROW_SUM_TOLERANCE:
        raise SelaggError(f"Block {block}'s attention rows do not sum to 1 (off by up to {err:.3g}), so they are "
                          "not softmax probabilities; this attention module is not supported.")


def _check_all_captured(seen: set[int], depth: int, model: VisionTransformer) -> None:
    """A clear error when some block computed its attention without passing through `attn_drop`."""
    missing = sorted(set(range(depth)) - seen)
    if missing:
        name = type(model.blocks[missing[0]].attn).__name__
        raise SelaggError(f"No attention probabilities reached `attn_drop` in block(s) {missing} ({name}), so "
                          "their attention cannot be captured; use timm's standard Attention module.")


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class AttentionMaps:
    """Attention probabilities (blocks, images, heads, T, T), float32 on CPU, prefix tokens first."""

    probs: torch.Tensor
    layout: TokenLayout

    @property
    def prefix_to_patch(self) -> torch.Tensor:
        """(blocks, images, heads, prefix, gh, gw): what each [cls]/register token gives the patches."""
        p = self.layout.num_prefix_tokens
        return self.probs[..., :p, p:].unflatten(-1, self.layout.grid_size)

    @property
    def patch_to_patch(self) -> torch.Tensor:
        """(blocks, images, heads, N, N): attention among patch tokens only."""
        p = self.layout.num_prefix_tokens
        return self.probs[..., p:, p:]

    def query_index(self, query: str | int | tuple[int, int]) -> int:
        """Sequence index of a query: 'cls', 'reg<k>', a patch index 0..N-1, or a (row, col) patch."""
        names = self.layout.prefix_names
        if isinstance(query, str) and query in names:
            return names.index(query)
        if isinstance(query, tuple) and len(query) == 2 and all(0 <= q < g for q, g in zip(query, self.layout.grid_size)):
            return self.layout.num_prefix_tokens + query[0] * self.layout.grid_size[1] + query[1]
        if isinstance(query, (int, np.integer)) and 0 <= query < self.layout.num_patches:
            return self.layout.num_prefix_tokens + int(query)
        raise SelaggError(f"Unknown query token {query!r}; use one of {list(names)}, a patch index "
                          f"0..{self.layout.num_patches - 1}, or a (row, col) in the {self.layout.grid_size} grid.")

    def query_map(self, query: str | int | tuple[int, int] = "cls") -> torch.Tensor:
        """(blocks, images, heads, gh, gw): attention from one query token to every patch."""
        p = self.layout.num_prefix_tokens
        return self.probs[..., self.query_index(query), p:].unflatten(-1, self.layout.grid_size)


def _check_images(images) -> None:
    """A clear error unless images is a (batch, channels, height, width) tensor."""
    if not (isinstance(images, torch.Tensor) and images.ndim == 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise SelaggError(f"Expected a batch of images of shape (batch, channels, height, width), got {shape}; "
                          "add a batch axis with images[None] or iterate over a DataLoader.")


@torch.inference_mode()
def attention_maps(model: VisionTransformer, images: torch.Tensor) -> AttentionMaps:
    """Attention probabilities of every block and head for one batch of images."""
    _check_images(images)
    check_finite_items(images, "Image", 0, "remove or repair that image before measuring attention")
    layout, depth = token_layout(check_vit(model)), len(model.blocks)
    maps: dict[int, torch.Tensor] = {}
    dev = _model_device(model)
    num_tokens = layout.num_prefix_tokens + layout.num_patches

    heads = [m.num_heads for m in attention_modules(model)]

    def keep(block: int, probs: torch.Tensor) -> None:
        _check_probabilities(block, probs, num_tokens, heads[block])
        maps[block] = probs.detach().float().cpu()

    with _eval_mode(model), attention_hooks(model, keep):
        model.forward_features(images.to(dev))
    _check_all_captured(set(maps), depth, model)
    return AttentionMaps(torch.stack([maps[i] for i in range(depth)]), layout)


# ----------------------------------------------------------------------------- statistics of one batch
def renormalised_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of weights / weights.sum(-1) along the last axis; 0 for a row with no mass."""
    weights = weights.float()
    tiny = torch.finfo(weights.dtype).tiny
    mass = weights.sum(-1)
    safe = mass.clamp_min(tiny)
    # H(w / s) = ln s - sum(w ln w) / s: no renormalised copy of the map is needed. The clamp makes
    # 0 ln 0 = 0 (no NaN) and is several times faster than torch.special.xlogy on the CPU.
    w_log_w = (weights * weights.clamp_min(tiny).log()).sum(-1)
    entropy = safe.log() - w_log_w / safe
    return torch.where(mass > 0, entropy, 0.0).clamp(0.0, math.log(weights.shape[-1]))


def _share(weights: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Fraction of each row's mass that falls where `where` (B, N) is True; 0 for a row with no mass."""
    mass = weights.sum(-1)
    inside = (weights * where[:, None].to(weights.dtype)).sum(-1)
    return torch.where(mass > 0, inside / mass.clamp_min(torch.finfo(mass.dtype).tiny), 0.0)


def batch_statistics(probs: torch.Tensor, layout: TokenLayout,
                     object_masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Head-resolved statistics (B, heads) of one block's attention probs (B, heads, T, T), in float32."""
    probs = probs.float()
    p, n = layout.num_prefix_tokens, probs.shape[-1] - layout.num_prefix_tokens
    entropy = renormalised_entropy(probs[..., p:])  # (B, heads, T): each query's attention over the patches
    out = {"patch_self": probs[..., p:, p:].diagonal(dim1=-2, dim2=-1).mean(-1),
           "patch_patch_entropy": entropy[..., p:].mean(-1)}
    log_n = max(math.log(n), 1e-12)  # one patch: entropy 0, normalised 0
    out["patch_patch_entropy_norm"] = out["patch_patch_entropy"] / log_n
    if layout.num_registers:
        out["patch_to_registers"] = probs[..., p:, int(layout.has_cls):p].sum(-1).mean(-1)
    if layout.has_cls:
        to_patches = probs[..., 0, p:]
        out.update(cls_self=probs[..., 0, 0], cls_to_patch=to_patches.sum(-1), patch_to_cls=probs[..., p:, 0].mean(-1),
                   cls_patch_entropy=entropy[..., 0])
        out["cls_patch_entropy_norm"] = out["cls_patch_entropy"] / log_n
        if object_masks is not None:
            out["cls_object_share"] = _share(to_patches, object_masks.flatten(1).to(probs.device))
    return out


def residual_ratios(block_input: torch.Tensor, branch: torch.Tensor, layout: TokenLayout) -> dict[str, torch.Tensor]:
    """Per image (B,): ||attention branch output|| / ||block input|| for [cls] and averaged over patches."""
    ratio = branch.float().norm(dim=-1) / block_input.float().norm(dim=-1).clamp_min(1e-12)
    out = {"patch_residual_ratio": ratio[:, layout.num_prefix_tokens:].mean(-1)}
    if layout.has_cls:
        out["cls_residual_ratio"] = ratio[:, 0]
    return out


# ----------------------------------------------------------------------------- streamed over a dataset
@dataclass(frozen=True)
class AttentionStatistics:
    """Statistics averaged over images: per block (blocks,), and per head (blocks, heads) when asked for."""

    per_block: dict[str, np.ndarray]
    per_head: dict[str, np.ndarray] | None
    n_images: int
    layout: TokenLayout
    name: str = ""

    def __getitem__(self, statistic: str) -> np.ndarray:
        if statistic not in self.per_block:
            raise SelaggError(f"No statistic {statistic!r} here; available: {', '.join(self.per_block)}.")
        return self.per_block[statistic]

    def __contains__(self, statistic: str) -> bool:
        return statistic in self.per_block

    @property
    def depth(self) -> int:
        return len(next(iter(self.per_block.values())))

    def table(self, statistics: Iterable[str] | None = None, digits: int = 3) -> str:
        """A fixed-width text table: one row per block, one column per statistic."""
        names = [s for s in (statistics or STATISTICS) if s in self.per_block]
        width = max(8, digits + 4)
        head = ["block".rjust(5)] + [s.rjust(max(width, len(s))) for s in names]
        rows = [[str(b + 1).rjust(5)] + [f"{self.per_block[s][b]:.{digits}f}".rjust(max(width, len(s)))
                                        for s in names] for b in range(self.depth)]
        title = f"{self.name or 'attention statistics'}: {self.n_images} images, {self.layout.num_patches} patches"
        return "\n".join([title, "  ".join(head)] + ["  ".join(r) for r in rows])

    def __repr__(self) -> str:
        return self.table()


class _Accumulator:
    """Running sums of per-image statistics, (blocks, heads) or (blocks,), in float64."""

    def __init__(self, layout: TokenLayout, heads: list[int]):
        self.layout, self.heads, self.depth = layout, heads, len(heads)
        self.sums: dict[str, torch.Tensor] = {}
        self.object_masks: torch.Tensor | None = None
        self.seen: set[int] = set()
        self.n_images = 0

    def add(self, block: int, values: dict[str, torch.Tensor]) -> None:
        for name, v in values.items():
            total = v.sum(0).double()  # stays on the model's device: no synchronisation per block
            if name not in self.sums:
                self.sums[name] = total.new_zeros((self.depth, *total.shape))
            self.sums[name][block] += total

    def attention(self, block: int, probs: torch.Tensor) -> None:
        if block not in self.seen:
            _check_probabilities(block, probs, self.layout.num_prefix_tokens + self.layout.num_patches, self.heads[block])
            self.seen.add(block)
        self.add(block, batch_statistics(probs, self.layout, self.object_masks))

    def check_finite(self, batch: int, first_image: int, autocast) -> None:
        """A SelaggError naming the batch and block when this batch made any running sum NaN or infinite."""
        for name, total in self.sums.items():
            bad = ~torch.isfinite(total.reshape(self.depth, -1)).all(1)
            if bool(bad.any()):
                block = int(bad.nonzero()[0, 0])
                raise SelaggError(f"Batch {batch} (images {first_image} onwards) gave non-finite attention in block "
                                  f"{block} ({name}) although its images are finite, so the backbone overflowed"
                                  f"{' under autocast=' + str(autocast) if autocast else ''}; run it in float32 "
                                  "(autocast=False) or check its weights.")

    def residual(self, block: int, block_input: torch.Tensor, branch: torch.Tensor) -> None:
        self.add(block, residual_ratios(block_input, branch, self.layout))

    def result(self, per_head: bool, name: str) -> AttentionStatistics:
        means = {k: (v / self.n_images).cpu().numpy() for k, v in self.sums.items()}
        ordered = [k for k in STATISTICS if k in means]
        per_block = {k: means[k].mean(-1) if means[k].ndim == 2 else means[k] for k in ordered}
        heads = {k: means[k] for k in ordered if means[k].ndim == 2} if per_head else None
        return AttentionStatistics(per_block, heads, self.n_images, self.layout, name)


def _split_batch(batch, use_masks: bool | None, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images and, when the batch carries them and they are wanted, the object masks as bool (B, gh, gw)."""
    images = batch if isinstance(batch, torch.Tensor) else batch[0]
    object_masks = None if isinstance(batch, torch.Tensor) or len(batch) < 3 or use_masks is False else batch[2]
    _check_images(images)
    if use_masks and object_masks is None:
        raise SelaggError("Object masks were asked for but the batches carry none; pass a loader over "
                          "dataset.with_object_masks(), whose items are (image, label, object mask).")
    if object_masks is not None and (object_masks.ndim != 3 or tuple(object_masks.shape[1:]) != layout.grid_size):
        raise SelaggError(f"Object masks of shape {tuple(object_masks.shape)} do not match the model's patch grid "
                          f"{layout.grid_size}; give one (batch, {layout.grid_size[0]}, {layout.grid_size[1]}) "
                          "boolean mask per image, built with the model's patch size.")
    return images, None if object_masks is None else object_masks.bool()


@torch.inference_mode()
def attention_statistics(model: VisionTransformer, loader: Iterable, *, per_head: bool = False,
                         use_object_masks: bool | None = None, autocast: torch.dtype | bool | None = None,
                         name: str = "", progress: bool = True) -> AttentionStatistics:
    """The statistics of STATISTICS, averaged over every image the loader yields, reduced batch by batch.

    Batches are images, (images, labels) or (images, labels, object masks); masks are used when
    present unless `use_object_masks=False`. `autocast=None` means the GPU's native half precision (bf16,
    fp16 on a T4) and full precision on CPU.
    """
    layout, depth = token_layout(check_vit(model)), len(model.blocks)
    if isinstance(loader, torch.utils.data.Dataset):
        raise SelaggError(f"Statistics are streamed over batches, not over a {type(loader).__name__}; wrap the "
                          "dataset in torch.utils.data.DataLoader(dataset, batch_size=...).")
    acc = _Accumulator(layout, [m.num_heads for m in attention_modules(model)])
    dev = _model_device(model)
    total = len(loader) if hasattr(loader, "__len__") else None
    with _eval_mode(model), attention_hooks(model, acc.attention, acc.residual):
        bar = progress_bar(loader, enabled=progress, total=total, desc=f"attention statistics {name}".strip(),
                           leave=False)
        for number, batch in enumerate(bar):
            images, object_masks = _split_batch(batch, use_object_masks, layout)
            if len(images) == 0:  # an empty batch adds no image: nothing to measure
                continue
            check_finite_items(images, "Image", acc.n_images, "remove or repair that image before measuring attention")
            check_images_fit(model, images)
            acc.object_masks = object_masks
            with config.autocast(dev, autocast):
                model.forward_features(images.to(dev, non_blocking=True))
            acc.n_images += len(images)
            _check_all_captured(acc.seen, depth, model)
            acc.check_finite(number, acc.n_images - len(images), autocast)
    if acc.n_images == 0:
        raise SelaggError("The loader yielded no images; pass a DataLoader over a non-empty dataset.")
    return acc.result(per_head, name)
