"""Backbone names before any model is built: the tiny names, timm names with their tags, close-name suggestions,
and the names a full-scale run can use, so that settings are checked whole before any work."""
from __future__ import annotations

from pathlib import Path

from .errors import SelaggError

__all__ = ["TINY_NAMES", "RANDOM_INIT_SEED", "is_timm_name", "close_names", "check_full_scale_name"]

TINY_NAMES = ("tiny-mae", "tiny-jea", "tiny-random")

#: The seed of every untrained timm backbone, so that "random weights" name one set of weights.
RANDOM_INIT_SEED = 0


def is_timm_name(text: str) -> bool:
    """Whether timm knows the architecture and, when a `.tag` is given, that pretrained tag."""
    import timm

    if not timm.is_model(text):
        return False
    try:
        timm.models.get_pretrained_cfg(text)
    except RuntimeError:  # "Invalid pretrained tag"
        return False
    return True


def close_names(text: str) -> str:
    """', did you mean ...?' with up to three close timm or tiny names, or ''."""
    import difflib

    import timm

    candidates = [*TINY_NAMES, *timm.list_models(pretrained=True), *timm.list_models()]
    close = difflib.get_close_matches(text, candidates, n=3, cutoff=0.75)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def check_full_scale_name(name: str, where: str) -> None:
    """Refuse (naming `where` it came from) a name the full scale cannot run: a tiny backbone or a book checkpoint
    file (they read the tiny scale's 32-pixel grayscale images), or a name timm does not know."""
    text = str(name)
    if text in TINY_NAMES or (text.endswith(".safetensors") and "@" not in text):
        raise SelaggError(f"{text!r} in {where} reads the tiny scale's 32-pixel grayscale images, not the full "
                          "scale's 224-pixel colour images; name timm backbones there (e.g. "
                          "'vit_small_patch16_224.dino'), or run it at the tiny scale.")
    arch, _, weights = text.removeprefix("random:").partition("@")
    arch, _, seed = arch.partition(":") if text.startswith("random:") else (arch, "", "")
    if weights and not Path(weights).expanduser().is_file():
        raise SelaggError(f"{where} names {text!r}, but there is no weights file at {weights}; give the path of a "
                          ".safetensors, .pth or .bin file.")
    if not is_timm_name(arch) or (seed and not seed.isdigit()):
        raise SelaggError(f"{where} names {text!r}, which is not a backbone: give timm names (e.g. "
                          f"'vit_small_patch16_224.dino'), 'random:<timm name>' or '<timm name>@<weights file>'"
                          f"{close_names(arch)}.")
