"""Attention capture and statistics, checked against attention recomputed from q and k."""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.layers import Attention
from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer
from torch.utils.data import DataLoader, TensorDataset

from selagg_utils import SelaggError
from selagg_utils import attention as A
from selagg_utils.models import TokenLayout, tiny_vit, token_layout

torch.set_num_threads(1)
SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)  # a 4x4 grid of patches


def sharpened(model: VisionTransformer, factor: float = 25.0) -> VisionTransformer:
    """The model with q/k weights scaled up and prefix tokens drawn at unit scale: attention far from uniform."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(factor)
        for token in (model.cls_token, model.reg_token):
            if token is not None:
                token.normal_()
    return model.eval()


def vit_with_cls() -> VisionTransformer:
    torch.manual_seed(0)
    return sharpened(tiny_vit(**SMALL))


def vit_with_registers() -> VisionTransformer:
    torch.manual_seed(1)
    return sharpened(tiny_vit(**SMALL, reg_tokens=2, no_embed_class=True, init_values=0.1))


def vit_without_cls() -> VisionTransformer:
    torch.manual_seed(2)
    return sharpened(tiny_vit(**SMALL, class_token=False, global_pool="avg"))


MODELS = {"cls": vit_with_cls, "registers": vit_with_registers, "no-cls": vit_without_cls}


def images_and_masks(n: int = 7, grid: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, grid * 4, grid * 4, generator=g)
    masks = torch.rand(n, grid, grid, generator=g) < 0.3
    return images, masks


# ----------------------------------------------------------------------------- the reference, from q and k
@torch.no_grad()
def reference_pass(model: VisionTransformer, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per block: softmax(q k^T / sqrt(d)) from norm1's output and qkv's weights, the block input and branch."""
    seen: list[dict[str, torch.Tensor]] = [{} for _ in model.blocks]
    handles = []
    for i, block in enumerate(model.blocks):
        handles.append(block.register_forward_pre_hook(lambda _m, a, i=i: seen[i].__setitem__("x", a[0])))
        handles.append(block.norm1.register_forward_hook(lambda _m, _a, out, i=i: seen[i].__setitem__("h", out)))
    model.forward_features(images)
    for h in handles:
        h.remove()
    for block, s in zip(model.blocks, seen):
        attn = block.attn
        b, t, _ = s["h"].shape
        qkv = F.linear(s["h"], attn.qkv.weight, attn.qkv.bias).reshape(b, t, 3, attn.num_heads, attn.head_dim)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B, heads, T, head_dim)
        s["probs"] = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(attn.head_dim), dim=-1)
        s["branch"] = block.ls1(attn(s["h"]))
    return seen


def entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats along the last axis after renormalising, the textbook way."""
    p = p / p.sum(-1, keepdims=True)
    return -np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(-1)


def reference_statistics(model: VisionTransformer, images: torch.Tensor, masks: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-head (blocks, heads) and per-block (blocks,) statistics straight from the definitions."""
    p, has_cls = model.num_prefix_tokens, model.cls_token is not None
    out: dict[str, list] = {}
    for s in reference_pass(model, images):
        a = s["probs"].numpy()  # (B, heads, T, T)
        patches = a[..., p:, p:]
        n = patches.shape[-1]
        stats = {"patch_self": np.einsum("bhii->bhi", patches).mean(-1),
                 "patch_patch_entropy": entropy(patches).mean(-1)}
        stats["patch_patch_entropy_norm"] = stats["patch_patch_entropy"] / np.log(n)
        ratio = (s["branch"].double().norm(dim=-1) / s["x"].double().norm(dim=-1)).numpy()  # (B, T)
        stats["patch_residual_ratio"] = ratio[:, p:].mean(-1)
        if p > int(has_cls):
            stats["patch_to_registers"] = a[..., p:, int(has_cls):p].sum(-1).mean(-1)
        if has_cls:
            row = a[..., 0, p:]
            m = masks.flatten(1).numpy()[:, None, :]
            stats.update(cls_self=a[..., 0, 0], cls_to_patch=row.sum(-1), patch_to_cls=a[..., p:, 0].mean(-1),
                         cls_patch_entropy=entropy(row), cls_patch_entropy_norm=entropy(row) / np.log(n),
                         cls_object_share=(row * m).sum(-1) / row.sum(-1), cls_residual_ratio=ratio[:, 0])
        for k, v in stats.items():
            out.setdefault(k, []).append(v.mean(0))  # average over images
    return {k: np.stack(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- statistics against the reference
@pytest.mark.parametrize("kind", MODELS)
def test_statistics_match_direct_computation_from_q_and_k(kind):
    model = MODELS[kind]()
    images, masks = images_and_masks()
    expected = reference_statistics(model, images, masks)
    loader = DataLoader(TensorDataset(images, torch.zeros(len(images)), masks), batch_size=3)  # 3 + 3 + 1
    got = A.attention_statistics(model, loader, per_head=True, progress=False)
    assert got.n_images == len(images)
    assert set(got.per_block) == set(expected)
    for name, value in expected.items():
        if name in A.BLOCK_ONLY:
            np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_allclose(got.per_head[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(got[name], value.mean(-1), rtol=1e-4, atol=1e-6, err_msg=name)
    assert got["patch_patch_entropy_norm"].min() < 0.9, "the test model's attention should be far from uniform"


def test_statistics_of_a_real_register_model_keep_prefix_tokens_apart():
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28, num_classes=0).eval()
    layout = token_layout(model)
    assert (layout.has_cls, layout.num_registers, layout.grid_size) == (True, 4, (2, 2))
    assert layout.prefix_names == ("cls", "reg0", "reg1", "reg2", "reg3")
    images = torch.randn(2, 3, 28, 28)
    maps = A.attention_maps(model, images)
    assert maps.probs.shape == (12, 2, 6, 9, 9)
    assert maps.prefix_to_patch.shape == (12, 2, 6, 5, 2, 2)
    assert maps.patch_to_patch.shape == (12, 2, 6, 4, 4)
    torch.testing.assert_close(maps.query_map("reg2"), maps.probs[..., 3, 5:].unflatten(-1, (2, 2)))
    stats = A.attention_statistics(model, DataLoader(images, batch_size=1), progress=False)
    assert "patch_to_registers" in stats and stats.depth == 12
    total = stats["cls_self"] + stats["cls_to_patch"]
    assert np.all(total < 1), "what [cls] gives the registers is in neither [cls] nor patch statistics"


def test_without_cls_only_patch_statistics():
    stats = A.attention_statistics(vit_without_cls(), [images_and_masks()[0]], progress=False)
    assert set(stats.per_block) == {"patch_self", "patch_patch_entropy", "patch_patch_entropy_norm",
                                    "patch_residual_ratio"}
    with pytest.raises(SelaggError, match="No statistic 'cls_self'"):
        stats["cls_self"]


def test_attention_maps_match_direct_computation_and_timm_attention_extract():
    model = vit_with_cls()
    images, _ = images_and_masks(3)
    maps = A.attention_maps(model, images)
    expected = torch.stack([s["probs"] for s in reference_pass(model, images)]).float()
    torch.testing.assert_close(maps.probs, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(maps.query_map("cls"), expected[..., 0, 1:].unflatten(-1, (4, 4)))
    torch.testing.assert_close(maps.query_map((1, 2)), expected[..., 1 + 6, 1:].unflatten(-1, (4, 4)))
    with A.unfused_attention(model):
        extracted = timm.utils.AttentionExtract(model, method="hook")(images)
    torch.testing.assert_close(maps.probs, torch.stack(list(extracted.values())))
    with pytest.raises(SelaggError, match="Unknown query token"):
        maps.query_map("reg0")


def test_autocast_bf16_gives_float32_results_close_to_full_precision():
    model, (images, masks) = vit_with_cls(), images_and_masks(8)
    loader = DataLoader(TensorDataset(images, torch.zeros(8), masks), batch_size=4)
    full = A.attention_statistics(model, loader, progress=False)
    half = A.attention_statistics(model, loader, autocast=torch.bfloat16, progress=False)
    for name in full.per_block:
        assert half[name].dtype == np.float64 and np.all(np.isfinite(half[name]))
        np.testing.assert_allclose(half[name], full[name], rtol=0.05, atol=0.02, err_msg=name)


# ----------------------------------------------------------------------------- entropy edge cases and properties
def layout_of(has_cls: bool = True, registers: int = 0, grid: tuple[int, int] = (4, 4)) -> TokenLayout:
    return TokenLayout(has_cls, registers, grid)


def test_uniform_attention_has_normalised_entropy_one():
    layout = layout_of(registers=1)
    t = layout.num_prefix_tokens + layout.num_patches
    stats = A.batch_statistics(torch.full((2, 3, t, t), 1 / t), layout)
    for name in ("cls_patch_entropy_norm", "patch_patch_entropy_norm"):
        torch.testing.assert_close(stats[name], torch.ones(2, 3))
    torch.testing.assert_close(stats["cls_patch_entropy"], torch.full((2, 3), math.log(16)))


def test_one_hot_attention_has_entropy_zero_and_no_nan():
    layout = layout_of()
    probs = torch.zeros(1, 2, 17, 17)
    probs[..., 5] = 1.0  # every query looks at patch 4 only
    stats = A.batch_statistics(probs, layout, object_masks=torch.arange(16).reshape(1, 4, 4) == 4)
    for name in ("cls_patch_entropy", "cls_patch_entropy_norm", "patch_patch_entropy", "cls_self"):
        torch.testing.assert_close(stats[name], torch.zeros(1, 2))
    torch.testing.assert_close(stats["cls_object_share"], torch.ones(1, 2))
    torch.testing.assert_close(stats["patch_self"], torch.full((1, 2), 1 / 16))
    self_only = torch.eye(17).expand(1, 2, 17, 17)  # [cls] keeps everything: no mass on patches at all
    stats = A.batch_statistics(self_only, layout, object_masks=torch.ones(1, 4, 4, dtype=torch.bool))
    assert all(torch.isfinite(v).all() for v in stats.values())
    torch.testing.assert_close(stats["cls_patch_entropy"], torch.zeros(1, 2))


@settings(max_examples=60, deadline=None)
@given(has_cls=st.booleans(), registers=st.integers(0, 2), rows=st.integers(1, 4), cols=st.integers(1, 4),
       heads=st.integers(1, 3), log_temperature=st.floats(-3, 3), seed=st.integers(0, 2**16))
def test_entropies_and_self_attention_stay_in_range(has_cls, registers, rows, cols, heads, log_temperature, seed):
    layout = layout_of(has_cls, registers, (rows, cols))
    t = layout.num_prefix_tokens + layout.num_patches
    logits = torch.randn(2, heads, t, t, generator=torch.Generator().manual_seed(seed)) * 10 ** log_temperature
    stats = A.batch_statistics(logits.softmax(-1), layout, object_masks=torch.rand(2, rows, cols) < 0.5)
    ln_n = math.log(layout.num_patches)
    for name, value in stats.items():
        assert torch.isfinite(value).all(), name
        upper = ln_n if name.endswith("entropy") else 1.0
        assert value.min() >= 0 and value.max() <= upper + 1e-6, (name, value)


# ----------------------------------------------------------------------------- the fused setting
def test_fused_setting_is_restored_and_plain_forward_stays_fused(monkeypatch):
    model = vit_with_cls()
    model.blocks[1].attn.fused_attn = False  # a mixed setting must come back as it was
    before = [b.attn.fused_attn for b in model.blocks]
    images, masks = images_and_masks(4)
    A.attention_statistics(model, [images], progress=False)
    A.attention_maps(model, images)
    with pytest.raises(SelaggError):
        A.attention_statistics(model, [], progress=False)
    assert [b.attn.fused_attn for b in model.blocks] == before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())

    model.blocks[1].attn.fused_attn = True
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    A.attention_statistics(model, [images], progress=False)
    assert calls == []
    model.forward_features(images)
    assert len(calls) == len(model.blocks)


# ----------------------------------------------------------------------------- errors a reader can cause
def one_sentence(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text.endswith(".") and text[0].isupper(), text
    return text


class FusedOnly(Attention):
    """An attention module that always takes the fused path, so its probabilities never exist."""

    def forward(self, x, attn_mask=None, is_causal=False):
        self.fused_attn = True
        return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)


def test_error_for_a_model_that_is_not_a_vit():
    with pytest.raises(SelaggError) as err:
        A.attention_statistics(torch.nn.Conv2d(1, 4, 3), [torch.randn(1, 1, 8, 8)])
    assert "timm VisionTransformer" in one_sentence(err)
    with pytest.raises(SelaggError):
        A.attention_maps(timm.create_model("resnet18", pretrained=False), torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("build", [
    lambda: VisionTransformer(**SMALL, in_chans=1, block_fn=ParallelScalingBlock),
    lambda: VisionTransformer(**SMALL, in_chans=1, attn_layer="diff"),
], ids=["parallel-block", "diff-attention"])
def test_error_for_a_vit_whose_attention_module_is_not_supported(build):
    model = build()
    with pytest.raises(SelaggError) as err:
        A.attention_maps(model, torch.randn(1, 1, 16, 16))
    assert "Attention" in one_sentence(err)
    assert all(getattr(b, "fused_attn", getattr(getattr(b, "attn", None), "fused_attn", True)) for b in model.blocks)


def test_error_for_a_vit_whose_attention_bypasses_attn_drop():
    model = vit_with_cls()
    model.blocks[1].attn.__class__ = FusedOnly
    with pytest.raises(SelaggError) as err:
        A.attention_statistics(model, [torch.randn(2, 1, 16, 16)], progress=False)
    assert "block(s) [1]" in one_sentence(err)
    assert model.blocks[0].attn.fused_attn


def test_error_for_an_empty_loader():
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 16, 16), torch.zeros(0)), batch_size=4)
    with pytest.raises(SelaggError) as err:
        A.attention_statistics(vit_with_cls(), empty, progress=False)
    assert "no images" in one_sentence(err)


def test_error_for_object_masks_on_another_grid():
    images, _ = images_and_masks(2)
    wrong = torch.zeros(2, 8, 8, dtype=torch.bool)
    with pytest.raises(SelaggError) as err:
        A.attention_statistics(vit_with_cls(), [(images, torch.zeros(2), wrong)], progress=False)
    assert "(4, 4)" in one_sentence(err)


def test_error_when_masks_are_asked_for_but_missing():
    with pytest.raises(SelaggError) as err:
        A.attention_statistics(vit_with_cls(), [(torch.randn(2, 1, 16, 16), torch.zeros(2))], use_object_masks=True,
                               progress=False)
    one_sentence(err)


def test_error_for_a_dataset_instead_of_a_loader_and_for_unbatched_images():
    images, masks = images_and_masks(2)
    with pytest.raises(SelaggError) as err:
        A.attention_statistics(vit_with_cls(), TensorDataset(images, torch.zeros(2)), progress=False)
    assert "DataLoader" in one_sentence(err)
    with pytest.raises(SelaggError) as err:
        A.attention_maps(vit_with_cls(), images[0])
    assert "(batch, channels, height, width)" in one_sentence(err)


def test_default_autocast_follows_the_devices_native_half_precision(monkeypatch):
    """A T4 only emulates bfloat16: the statistics' default autocast must pick float16 there."""
    from selagg_utils.config import autocast

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert autocast(torch.device("cuda"), None).fast_dtype == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert autocast(torch.device("cuda"), None).fast_dtype == torch.bfloat16
    assert not isinstance(autocast(torch.device("cpu"), None), torch.autocast)
