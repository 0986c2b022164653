"""Backbones: the shipped tiny ViTs, timm checkpoints (full scale) and local checkpoint files."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from .checks import SelaggError, env_flag, load_weights, manifest_path, sha256_of
from .config import RANDOM_INIT_SEED, TINY_NAMES, close_names, is_timm_name

__all__ = ["TINY_CONFIG", "tiny_vit", "tiny_checkpoint_path", "data_config", "load_backbone",
           "model_from_checkpoint", "TokenLayout", "token_layout", "read_manifest"]

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"

#: The tiny ViT every offline chapter uses: 32x32 grayscale, 4x4 patches (an 8x8 grid), 6 blocks.
TINY_CONFIG: dict = dict(img_size=32, patch_size=4, in_chans=1, embed_dim=128, depth=6, num_heads=4,
                         mlp_ratio=4.0, num_classes=0, global_pool="token")

#: Full-scale backbones the book uses (timm names); any timm ViT name works too.
FULL_NAMES = ("vit_base_patch16_224.mae", "vit_base_patch16_224.dino", "vit_small_patch16_224.dino")


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


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone name stands for: where its weights come from and how to build it.

    kind: "tiny" (a shipped checkpoint), "file" (a local checkpoint with this book's manifest),
    "timm" (a timm architecture; pretrained hub weights, a local weights file, or seeded random
    weights) or "random" (the untrained control `random:<timm name>[:seed]`).
    """

    name: str
    kind: str
    arch: str | None = None
    path: Path | None = None
    pretrained: bool = False
    seed: int | None = None
    img_size: int | None = None


def resolve_backbone(name: str | os.PathLike, scale: str | None = None,
                     pretrained: bool | None = None) -> BackboneSpec:
    """The one reading of a backbone name, shared by `load_backbone`, the feature cache and the statistics.

    Accepted: a tiny name, a local `.safetensors` checkpoint of this book, `random:<timm name>` (or
    `random:<timm name>:<seed>`), `<timm name>@<weights file>`, and a timm name (pretrained weights
    at full scale unless SELAGG_PRETRAINED=0 or `pretrained=False`; seeded random weights otherwise).
    """
    from .config import scale as resolve_scale

    text = str(name)
    if text in TINY_NAMES:
        return BackboneSpec(text, "tiny", path=tiny_checkpoint_path(text))
    from .weights.hub import full_scale_img_size  # 224 px for every timm backbone
    arch, _, weights = text.partition("@")
    if weights and is_timm_name(arch):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise SelaggError(f"No weights file at {path} for {arch!r}; give the path of a .safetensors, .pth or "
                              ".bin file holding that architecture's weights.")
        return BackboneSpec(text, "timm", arch, path, img_size=full_scale_img_size(arch))
    if text.endswith(".safetensors") or Path(text).is_file():
        if not Path(text).is_file():
            raise SelaggError(f"No checkpoint file at {text}; check the path, or use a tiny name "
                              f"({', '.join(TINY_NAMES)}).")
        return BackboneSpec(Path(text).name, "file", path=Path(text))
    if text.startswith("random:"):
        arch, _, seed = text[len("random:"):].partition(":")
        if is_timm_name(arch) and (not seed or seed.isdigit()):
            return BackboneSpec(text, "random", arch, seed=int(seed or RANDOM_INIT_SEED),
                                img_size=full_scale_img_size(arch))
        raise SelaggError(f"Unknown backbone {text!r}: after 'random:' give a timm name (and optionally "
                          f"':<seed>'), e.g. 'random:vit_base_patch16_224'{close_names(arch)}.")
    if is_timm_name(text):
        chosen_scale = resolve_scale(scale)
        use_hub = uses_pretrained_weights(chosen_scale, pretrained)
        if use_hub and chosen_scale != "full":
            raise SelaggError(f"{text!r} with pretrained weights needs the full scale (SELAGG_SCALE=full); "
                              f"offline, use a tiny backbone ({', '.join(TINY_NAMES)}).")
        return BackboneSpec(text, "timm", text, pretrained=use_hub, seed=None if use_hub else RANDOM_INIT_SEED,
                            img_size=full_scale_img_size(text))
    raise SelaggError(f"Unknown backbone {text!r}: use a tiny name ({', '.join(TINY_NAMES)}), a local .safetensors "
                      f"checkpoint, 'random:<timm name>', or a timm name such as {FULL_NAMES[0]!r} "
                      f"(pretrained weights need the full scale){close_names(text)}.")


def data_config(name: str | os.PathLike) -> dict | None:
    """How a backbone expects its images (timm's pretrained data config: size, interpolation, crop, mean, std).

    None for the tiny backbones and this book's checkpoint files, which read the lab's tensors as stored.
    """
    from timm.data import resolve_data_config

    spec = resolve_backbone(name, scale="full", pretrained=False)
    if spec.arch is None:
        return None
    cfg = timm.models.get_pretrained_cfg(spec.arch)
    config = resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg is not None else {})
    if spec.img_size:  # the backbone is built at 224 px (DINOv2's default is 518)
        config["input_size"] = (config["input_size"][0], spec.img_size, spec.img_size)
    return config


def load_backbone(name_or_path: str | os.PathLike, scale: str | None = None, pretrained: bool | None = None,
                  device: str | torch.device = "cpu", **timm_kwargs) -> VisionTransformer:
    """A frozen ViT in eval mode from any name `resolve_backbone` accepts.

    timm names load pretrained weights only at full scale (`pretrained=None` means "if full");
    `pretrained=False` builds the architecture alone, which works offline, and so does the name
    `random:<timm name>` (the untrained control at full scale).
    """
    spec = resolve_backbone(name_or_path, scale, pretrained)
    if spec.kind in ("tiny", "file"):
        model = model_from_checkpoint(spec.path)
    else:
        from .weights.hub import timm_backbone  # hub weights, a local weights file, or seeded random ones

        model = timm_backbone(spec, **timm_kwargs)
    return model.eval().requires_grad_(False).to(device)


def uses_pretrained_weights(scale: str, pretrained: bool | None) -> bool:
    """Whether a timm name loads pretrained weights: if asked for, else at full scale unless SELAGG_PRETRAINED=0."""
    if pretrained is None:  # SELAGG_PRETRAINED=0 runs the full-scale code path offline, with random weights
        return scale == "full" and env_flag("SELAGG_PRETRAINED", True)
    return bool(pretrained)


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


def check_images_fit(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Refuse a batch whose channels or size the ViT cannot read (a tiny backbone given 224-pixel colour images)."""
    embed = getattr(model, "patch_embed", None)
    if embed is None or not isinstance(images, torch.Tensor) or images.ndim != 4:
        return
    want = (int(embed.proj.in_channels), *(tuple(embed.img_size) if getattr(embed, "strict_img_size", True)
                                           and not getattr(embed, "dynamic_img_size", False) else ()))
    if tuple(images.shape[1:1 + len(want)]) != want:
        raise SelaggError(f"The backbone reads images of {' x '.join(map(str, want))} (channels x height x width), but "
                          f"the dataset gives {' x '.join(map(str, images.shape[1:]))}; read the dataset as the "
                          "backbone expects (data.load_split(settings, split, models.data_config(name))), or pick a "
                          "backbone of the scale the dataset belongs to.")


@dataclass(frozen=True)
class TokenLayout:
    """Where a ViT's tokens sit: prefix tokens first ([cls], then registers), then the patches row by row."""

    has_cls: bool
    num_registers: int
    grid_size: tuple[int, int]

    def __post_init__(self) -> None:
        """Refuse counts and grids that no ViT has (a wrong layout pools or labels the wrong tokens)."""
        if not isinstance(self.has_cls, (bool, int)) or isinstance(self.num_registers, bool) \
                or not isinstance(self.num_registers, int) or self.num_registers < 0:
            raise SelaggError(f"A token layout needs has_cls True or False and a whole number of registers >= 0, got "
                              f"has_cls={self.has_cls!r}, num_registers={self.num_registers!r}; read it from the "
                              "backbone with models.token_layout(model).")
        grid = tuple(self.grid_size) if isinstance(self.grid_size, (tuple, list, torch.Size)) else (self.grid_size,)
        if len(grid) != 2 or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid):
            raise SelaggError(f"A patch grid is (rows, cols) of positive whole numbers, got {self.grid_size!r}; "
                              "read it from the backbone with models.token_layout(model).")
        object.__setattr__(self, "has_cls", bool(self.has_cls))
        object.__setattr__(self, "grid_size", (int(grid[0]), int(grid[1])))

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.has_cls) + self.num_registers

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @property
    def prefix_names(self) -> tuple[str, ...]:
        return ("cls",) * self.has_cls + tuple(f"reg{r}" for r in range(self.num_registers))


def token_layout(model: torch.nn.Module) -> TokenLayout:
    """The prefix/patch layout of a timm ViT's token sequence."""
    if not hasattr(model, "patch_embed"):
        raise SelaggError(f"A token layout is read from a timm VisionTransformer, not from a {type(model).__name__}; "
                          "build the backbone with models.load_backbone or timm.create_model('vit_...').")
    has_cls = getattr(model, "cls_token", None) is not None
    num_registers = int(getattr(model, "num_reg_tokens", 0) or 0)
    if int(getattr(model, "num_prefix_tokens", has_cls + num_registers)) != has_cls + num_registers:
        raise SelaggError(f"{type(model).__name__} has {model.num_prefix_tokens} prefix tokens that are neither "
                          "[cls] nor registers; only timm ViTs with [cls] and/or register tokens are supported.")
    return TokenLayout(has_cls, num_registers, tuple(int(g) for g in model.patch_embed.grid_size))


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a weights file: a JSON object with a sha256 string, or a clear error."""
    mpath = manifest_path(path)
    if not mpath.is_file():
        raise SelaggError(f"Checkpoint {path} has no manifest {mpath.name} beside it; it cannot be verified.")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SelaggError(f"The manifest {mpath} is not valid JSON ({err.__class__.__name__}); a manifest is a JSON "
                          "object written by save_checkpoint: restore it or save the checkpoint again.") from None
    sha = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        found = "no JSON object" if not isinstance(manifest, dict) else "no 64-digit hex sha256"
        raise SelaggError(f"The manifest {mpath} holds {found}; a manifest is a JSON object with the weights' "
                          "sha256, as save_checkpoint writes it: restore it or save the checkpoint again.")
    return manifest


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Verified (state_dict, manifest): refuses a file whose sha256 differs from its manifest."""
    path = Path(path)
    if not path.is_file():
        raise SelaggError(f"No checkpoint file at {path}.")
    manifest = read_manifest(path)
    actual = sha256_of(path)
    if actual != manifest.get("sha256"):
        raise SelaggError(f"Checkpoint {path.name} does not match its manifest (sha256 {actual[:12]}… "
                          f"instead of {str(manifest.get('sha256'))[:12]}…): refusing to load a changed or damaged file.")
    from .weights.files import read_weights_file  # a sentence, not a traceback, for a file it cannot read

    return read_weights_file(path), manifest


def sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix.`, with the prefix removed."""
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
