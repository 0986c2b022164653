"""Weights files: this book's checkpoints written atomically with their manifest, and other training
code's files read whole (safetensors or torch.save) with a known nesting or wrapper prefix removed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from ..cache.files import _atomic_write
from ..checks import SelaggError, manifest_path, sha256_of

__all__ = ["save_checkpoint", "vit_config", "read_weights_file", "unwrapped_state", "fitted_state"]


def save_checkpoint(path: str | os.PathLike, state: dict[str, torch.Tensor], manifest: dict) -> dict:
    """Write weights (safetensors) and manifest (JSON, with the weights' sha256); returns the manifest."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    _atomic_write(path, lambda tmp: save_file(state, tmp))
    manifest = {**manifest, "weights": path.name, "sha256": sha256_of(path)}
    _atomic_write(manifest_path(path), lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n"))
    return manifest


def read_weights_file(path: str | os.PathLike) -> dict:
    """The tensors of a .safetensors file, or what a .pth/.bin file holds (read with weights_only), or a SelaggError
    naming the file when it is empty, truncated or not such a file."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as err:  # SafetensorError, UnpicklingError, EOFError, RuntimeError, OSError: a file it cannot read
        if "Unsupported global" in str(err):  # a training checkpoint with Python objects (its arguments, say)
            raise SelaggError(f"{path.name} holds Python objects besides tensors (such as training arguments), which "
                              "are never unpickled here, for safety; save the model's weights alone: "
                              "torch.save(checkpoint['model'], path), or as .safetensors.") from None
        what = "safetensors" if path.suffix == ".safetensors" else "PyTorch (torch.save)"
        raise SelaggError(f"Could not read {path.name} as a {what} weights file ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:120] if str(err) else 'no detail'}); the file is empty, "
                          "truncated or of another kind: download or save it again.") from None


#: Where training repositories nest a model's weights in a checkpoint (MAE: 'model'; DINO: 'teacher').
WRAPPER_NESTS = ("model", "state_dict", "teacher", "model_ema", "module")


#: Prefixes training code puts before a model's weight names (DistributedDataParallel, DINO, this book's files).
WRAPPER_PREFIXES = ("module.", "backbone.", "model.", "teacher.", "encoder.")


def unwrapped_state(state, own: set[str], source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The weights of a checkpoint with a known nesting ('model', 'state_dict', ...) and wrapper prefixes
    ('module.', 'backbone.', ...) removed, as far as they do not belong to the model's own names (`own`), and
    the steps taken, in words."""
    steps = []
    while isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        nest = next((k for k in WRAPPER_NESTS if isinstance(state.get(k), dict)), None)
        if nest is None:
            kinds = sorted({type(v).__name__ for v in state.values() if not isinstance(v, torch.Tensor)})
            raise SelaggError(f"{source} holds {', '.join(kinds)} values besides tensors but none of the known "
                              f"places of a model's weights ({', '.join(map(repr, WRAPPER_NESTS))}); save the "
                              "model's state_dict alone (torch.save(model.state_dict(), path)).")
        steps.append(f"took the weights under {nest!r}")
        state = state[nest]
    if not isinstance(state, dict) or not state:
        raise SelaggError(f"{source} holds no named tensors; save a model's state_dict (safetensors or torch.save).")
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            inside = [k for k in state if k.startswith(prefix)]
            if inside and not own & set(inside) and (len(inside) == len(state) or not own & set(state)):
                others = sorted(k for k in state if not k.startswith(prefix))
                dropped = f", leaving out {len(others)} weights outside it ({', '.join(others[:2])}" \
                          f"{', ...' if len(others) > 2 else ''})" if others else ""
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                steps.append(f"removed the prefix {prefix!r}{dropped}")
                changed = True
    return state, steps


def fitted_state(model: torch.nn.Module, path: Path, arch: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The weights of a local file under a timm ViT's own names (a known nesting or wrapper prefix and a
    classifier removed, timm's conversions applied), and the steps taken, in words."""
    import sys

    own = set(model.state_dict())
    state, steps = unwrapped_state(read_weights_file(path), own, path.name)
    head = sorted(k for k in state if k.split(".")[0] == "head" and k not in own)  # a classifier; the backbone has none
    state = {k: v for k, v in state.items() if k not in head}
    steps += [f"left out the classifier {', '.join(head)}"] if head else []
    convert = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if convert is not None:
        try:
            state = convert(state, model)
        except Exception as err:  # timm's conversions assume its layouts; anything else is a file that does not fit
            raise SelaggError(f"The weights in {path.name} do not fit the architecture {arch!r} ({type(err).__name__}:"
                              f" {str(err)[:120]}); give that architecture's checkpoint.") from None
    return state, steps


def vit_config(model: VisionTransformer) -> dict:
    """The keyword arguments that rebuild a (tiny) ViT's architecture, read from the model object itself."""
    block = model.blocks[0]
    return dict(img_size=int(model.patch_embed.img_size[0]), patch_size=int(model.patch_embed.patch_size[0]),
                in_chans=int(model.patch_embed.proj.in_channels), embed_dim=int(model.embed_dim),
                depth=len(model.blocks), num_heads=int(block.attn.num_heads),
                mlp_ratio=block.mlp.fc1.out_features / model.embed_dim, num_classes=int(model.num_classes),
                global_pool=model.global_pool)
