"""Backbones: the shipped tiny ViTs, timm checkpoints (full scale) and local checkpoint files."""
from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from .checkpoints import load_checkpoint, sub_state
from .errors import SelaggError

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"

#: The tiny ViT every offline chapter uses: 32x32 grayscale, 4x4 patches (an 8x8 grid), 6 blocks.
TINY_CONFIG: dict = dict(img_size=32, patch_size=4, in_chans=1, embed_dim=128, depth=6, num_heads=4,
                         mlp_ratio=4.0, num_classes=0, global_pool="token")
TINY_NAMES = ("tiny-mae", "tiny-jea", "tiny-random")

#: Full-scale backbones the book uses (timm names); any timm ViT name works too.
FULL_NAMES = ("vit_base_patch16_224.mae", "vit_base_patch16_224.dino", "vit_small_patch16_224.dino")

#: The seed of every untrained timm backbone, so that "random weights" name one set of weights.
RANDOM_INIT_SEED = 0


def tiny_vit(**overrides) -> VisionTransformer:
    """A freshly initialised tiny ViT (TINY_CONFIG, with any field overridden)."""
    config = {**TINY_CONFIG, **overrides}
    check_image_size(config["img_size"], config["patch_size"])
    return VisionTransformer(**config)


def check_image_size(img_size: int | tuple[int, int], patch_size: int) -> None:
    """Raise a clear error when the patch size does not divide the image size."""
    sizes = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if any(s % patch_size for s in sizes):
        raise SelaggError(f"Image size {img_size} is not divisible by patch size {patch_size}; "
                          f"use a multiple of {patch_size} (e.g. {sizes[0] // patch_size * patch_size}).")


def tiny_checkpoint_path(name: str) -> Path:
    """Where a shipped tiny checkpoint lives."""
    return CHECKPOINT_DIR / f"{name}.safetensors"


def load_backbone(name_or_path: str | os.PathLike, scale: str | None = None, pretrained: bool | None = None,
                  device: str | torch.device = "cpu", **timm_kwargs) -> VisionTransformer:
    """A frozen ViT in eval mode from a tiny name, a timm name or a local `.safetensors` checkpoint.

    timm names load pretrained weights only at full scale (`pretrained=None` means "if full");
    `pretrained=False` builds the architecture alone, which works offline, and so does the name
    `random:<timm name>` (the untrained control at full scale).
    """
    from .config import scale as resolve_scale

    name = str(name_or_path)
    if name in TINY_NAMES:
        model = model_from_checkpoint(tiny_checkpoint_path(name))
    elif name.endswith(".safetensors") or Path(name).is_file():
        model = model_from_checkpoint(name)
    elif name.startswith("random:") and timm.is_model(name[7:]):  # an untrained control of a timm architecture
        model = _timm_backbone(name[7:], resolve_scale(scale), False, **timm_kwargs)
    elif timm.is_model(name):
        model = _timm_backbone(name, resolve_scale(scale), pretrained, **timm_kwargs)
    else:
        raise SelaggError(f"Unknown backbone {name!r}: use a tiny name ({', '.join(TINY_NAMES)}), a local "
                          f".safetensors checkpoint, or a timm name such as {FULL_NAMES[0]!r} (pretrained "
                          "timm weights need the full scale).")
    return model.eval().requires_grad_(False).to(device)


def uses_pretrained_weights(scale: str, pretrained: bool | None) -> bool:
    """Whether a timm name loads pretrained weights: if asked for, else at full scale unless SELAGG_PRETRAINED=0."""
    if pretrained is None:  # SELAGG_PRETRAINED=0 runs the full-scale code path offline, with random weights
        return scale == "full" and os.environ.get("SELAGG_PRETRAINED", "1") != "0"
    return bool(pretrained)


def _timm_backbone(name: str, scale: str, pretrained: bool | None, **kwargs) -> VisionTransformer:
    """A timm ViT; pretrained weights are fetched only when the full scale is asked for; random ones are seeded."""
    pretrained = uses_pretrained_weights(scale, pretrained)
    if pretrained and scale != "full":
        raise SelaggError(f"{name!r} with pretrained weights needs the full scale (SELAGG_SCALE=full); "
                          f"offline, use a tiny backbone ({', '.join(TINY_NAMES)}).")
    try:
        with torch.random.fork_rng(devices=[]):  # the same random weights every time, the caller's RNG untouched
            torch.manual_seed(RANDOM_INIT_SEED)
            model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except (OSError, RuntimeError) as err:
        if pretrained and _looks_offline(err):
            raise SelaggError(f"Could not download the weights of {name!r}: no network connection; the full "
                              "scale needs internet access once (weights are then cached), the tiny scale runs offline.") from None
        raise
    if not isinstance(model, VisionTransformer):
        raise SelaggError(f"{name!r} is a {type(model).__name__}, not a timm VisionTransformer; this book "
                          "works with ViTs (patch tokens plus optional [cls] and register tokens).")
    return model


def _looks_offline(err: BaseException) -> bool:
    """Whether an exception from the hub client means "no network" (or offline mode)."""
    text = f"{type(err).__name__} {err}".lower()
    return any(s in text for s in ("offline", "connection", "resolve", "network", "timed out", "localentrynotfound",
                                   "cannot find the requested files", "max retries"))


def model_from_checkpoint(path: str | os.PathLike) -> VisionTransformer:
    """The backbone stored in a verified checkpoint file (its `backbone.*` weights)."""
    state, manifest = load_checkpoint(path)
    config = manifest.get("model_config")
    if not isinstance(config, dict):
        raise SelaggError(f"Checkpoint {Path(path).name} has no model_config in its manifest.")
    try:
        model = tiny_vit(**config) if config.get("in_chans") is not None else VisionTransformer(**config)
    except SelaggError:
        raise
    except (TypeError, ValueError, RuntimeError) as err:
        raise SelaggError(f"The model_config in the manifest of {Path(path).name} does not describe a timm "
                          f"VisionTransformer ({err}); restore the manifest or save the checkpoint again.") from None
    load_weights(model, sub_state(state, "backbone"), Path(path).name)
    return model


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with one clear sentence when names or shapes do not fit the model."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own.keys() & state.keys()
             if own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(filter(None, [f"shapes differ: {', '.join(wrong[:3])}" if wrong else "",
                                         f"missing: {', '.join(missing[:3])}" if missing else "",
                                         f"unexpected: {', '.join(unexpected[:3])}" if unexpected else ""]))
        raise SelaggError(f"The weights in {source} do not fit the model its manifest describes ({detail}).")
    model.load_state_dict(state)


def has_cls_token(model: VisionTransformer) -> bool:
    """Whether the ViT has a [cls] token."""
    return getattr(model, "cls_token", None) is not None


def num_prefix_tokens(model: VisionTransformer) -> int:
    """How many tokens precede the patches ([cls] and registers)."""
    return int(getattr(model, "num_prefix_tokens", 1 if has_cls_token(model) else 0))


def patch_grid(model: VisionTransformer) -> tuple[int, int]:
    """The (rows, cols) grid of patch tokens."""
    return tuple(model.patch_embed.grid_size)
