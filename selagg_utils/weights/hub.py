"""timm's pretrained weights at full scale: whether they are already cached, and, when they are not,
one sentence within seconds if the hub cannot be reached.
"""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["looks_offline", "check_weights_reachable"]


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
