"""timm's pretrained weights at full scale: whether they are already cached, and, when they are not,
one sentence within seconds if the hub cannot be reached.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from ..checks import SelaggError, load_weights, notice
from ..config import RANDOM_INIT_SEED

__all__ = ["timm_backbone", "load_weights_file", "weights_cached", "check_weights_reachable", "looks_offline"]


def looks_offline(err: BaseException) -> bool:
    """Whether an exception from the hub client means "no network" (or offline mode)."""
    text = f"{type(err).__name__} {err}".lower()
    return any(s in text for s in ("offline", "connection", "resolve", "network", "timed out", "localentrynotfound",
                                   "cannot find the requested files", "max retries"))


def weights_cached(arch: str) -> bool:
    """Whether timm's pretrained weights for `arch` are already on this machine (no download needed)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        return False
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in filter(None, (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin",
                                      "open_clip_pytorch_model.bin")):
            if isinstance(try_to_load_from_cache(repo, filename, revision=revision or None), str):
                return True
        return False
    if cfg.url:
        hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
        return (hub_dir / Path(cfg.url).name).is_file()
    return False


def check_weights_reachable(arch: str) -> None:
    """One SelaggError sentence within seconds when pretrained weights are neither cached nor downloadable."""
    if weights_cached(arch):
        return
    import timm

    from .network import HUB_HOST, require_network

    cfg = timm.models.get_pretrained_cfg(arch)
    url = cfg.url if cfg is not None and cfg.url and not cfg.hf_hub_id else HUB_HOST
    require_network(url, f"the pretrained weights of {arch!r}",
                    "connect once (the weights are then cached), give a local file as '<timm name>@<path>', "
                    "set SELAGG_PRETRAINED=0 to rehearse with random weights, or use the tiny scale")


def timm_backbone(spec, **kwargs) -> VisionTransformer:
    """A timm ViT for a `models.BackboneSpec`: hub weights (after a quick network check), a local weights file, or
    seeded random weights."""

    if spec.img_size:
        kwargs.setdefault("img_size", spec.img_size)
    source = {}
    if spec.pretrained and spec.path is None:
        check_weights_reachable(spec.arch)
        source = dict(pretrained=True)
    try:
        with torch.random.fork_rng(devices=[]):  # the same random weights every time, the caller's RNG untouched
            torch.manual_seed(spec.seed if spec.seed is not None else RANDOM_INIT_SEED)
            model = timm.create_model(spec.arch, num_classes=0, **{"pretrained": False, **source}, **kwargs)
    except (OSError, RuntimeError, KeyError, ValueError) as err:
        if spec.pretrained and looks_offline(err):
            raise SelaggError(f"Could not download the weights of {spec.arch!r}: no network connection; the full "
                              "scale needs internet access once (weights are then cached), the tiny scale runs offline.") from None
        raise
    if not isinstance(model, VisionTransformer):
        raise SelaggError(f"{spec.arch!r} is a {type(model).__name__}, not a timm VisionTransformer; this book "
                          "works with ViTs (patch tokens plus optional [cls] and register tokens).")
    if spec.path is not None:
        load_weights_file(model, spec.path, spec.arch)
    return model



def load_weights_file(model: VisionTransformer, path: Path, arch: str) -> None:
    """Fill every weight of a timm ViT from a local file, all or nothing: a known nesting or wrapper prefix is
    removed (said in one line), timm's conversions applied, and any weight missing or left over refused."""
    from .files import fitted_state

    state, steps = fitted_state(model, path, arch)
    load_weights(model, state, path.name, f"the architecture {arch!r}")
    if steps:
        notice(f"Read the weights of {arch!r} from {path.name}: {'; '.join(steps)}.")


def full_scale_img_size(arch: str) -> int | None:
    """224 for a timm architecture whose default input is larger (DINOv2's 518 px), so every backbone sees 224 px."""

    cfg = timm.models.get_pretrained_cfg(arch)
    size = cfg.input_size[-1] if cfg is not None and cfg.input_size else None
    return 224 if size and size > 224 else None
