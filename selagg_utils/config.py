"""The two scales of the book: `tiny` (offline, CPU, the default) and `full` (timm weights, GPU)."""
from __future__ import annotations

import contextlib
import os
import random
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checks import SelaggError, env_flag, notice

SCALES = ("tiny", "full")
ENV_VAR = "SELAGG_SCALE"
#: At full scale, the most images a chapter reads per split (a seeded, class-stratified subset); unset = all.
MAX_IMAGES_VAR = "SELAGG_MAX_IMAGES"
#: At full scale, the further backbones of the paper's families (comma-separated names); unset = MORE_BACKBONES.
MORE_VAR = "SELAGG_MORE_BACKBONES"
#: DINOv2 with four registers (a joint-embedding model with register tokens) and I-JEPA (no [cls] token).
MORE_BACKBONES = ("vit_base_patch14_reg4_dinov2.lvd142m", "vit_huge_patch14_gap_224.in1k_ijepa")

__all__ = ["scale", "settings", "device", "seed_everything", "describe", "progress_bar", "resolve_device",
           "half_precision", "autocast", "process_device", "synchronize"]


def scale(value: str | None = None) -> str:
    """The scale in force: the argument if given, else $SELAGG_SCALE, else 'tiny'."""
    chosen = (value or os.environ.get(ENV_VAR) or "tiny").strip().lower()
    if chosen not in SCALES:
        raise SelaggError(f"Unknown scale {chosen!r}; choose 'tiny' (offline, CPU) or 'full' (timm weights, GPU).")
    return chosen


@dataclass(frozen=True)
class ScaleSettings:
    """What a chapter uses at one scale (n_train/n_eval: images per split; None = the whole split)."""

    scale: str
    mim: str
    jea: str
    control: str
    dataset: str
    batch_size: int
    n_train: int | None
    n_eval: int | None
    more: tuple[str, ...] = ()

    @property
    def backbones(self) -> tuple[str, str, str]:
        """The MIM model, the joint-embedding model and the untrained control, in the book's order."""
        return (self.mim, self.jea, self.control)


def max_images() -> int | None:
    """The per-split image cap of the full scale from $SELAGG_MAX_IMAGES (None when unset)."""
    raw = os.environ.get(MAX_IMAGES_VAR, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise SelaggError(f"{MAX_IMAGES_VAR}={raw!r} is not accepted: give a positive whole number of images per "
                          "split (e.g. 2000), or unset it to use whole splits.")
    return int(raw)


def more_backbones() -> tuple[str, ...]:
    """The further backbones of the full scale: $SELAGG_MORE_BACKBONES (comma-separated; empty = none), else the default."""
    raw = os.environ.get(MORE_VAR)
    if raw is None:
        return MORE_BACKBONES
    return tuple(name.strip() for name in raw.split(",") if name.strip())


#: Classes of each scale's dataset: an image cap below it leaves classes out of some splits.
DATASET_CLASSES = {"cluttered-digits": 10, "imagenette": 10}


def settings(value: str | None = None) -> ScaleSettings:
    """The backbones, dataset and sizes of a scale, checked whole (image cap, every backbone name, flags) before any
    work."""
    cap = max_images()
    if scale(value) == "tiny":
        if cap is not None:
            notice(f"{MAX_IMAGES_VAR}={cap} applies to the full scale only; the tiny scale draws its own 5000 "
                   "training and 2000 evaluation images (unset it, or set SELAGG_SCALE=full).")
        return ScaleSettings("tiny", "tiny-mae", "tiny-jea", "tiny-random", "cluttered-digits", 256, 5000, 2000)
    if cap is not None and cap < DATASET_CLASSES["imagenette"]:
        raise SelaggError(f"{MAX_IMAGES_VAR}={cap} is fewer images per split than imagenette's "
                          f"{DATASET_CLASSES['imagenette']} classes, so the splits would not share their classes and "
                          f"every accuracy would mean nothing; give at least {DATASET_CLASSES['imagenette']} (e.g. "
                          "500), or unset it.")
    more = more_backbones()
    for name in more:
        check_full_scale_name(name, MORE_VAR)
    env_flag("SELAGG_PRETRAINED", True)  # a misspelt flag is refused now, not when the first backbone loads
    return ScaleSettings("full", "vit_base_patch16_224.mae", "vit_base_patch16_224.dino", "random:vit_base_patch16_224",
                         "imagenette", 128, cap, cap, more=more)


def device(prefer: str | None = None, scale_name: str | None = None) -> torch.device:
    """CUDA if present, else CPU (or the device asked for, checked to exist); a warning when the full scale runs on a CPU."""
    chosen = resolve_device(prefer or None)
    if chosen.type == "cpu" and scale(scale_name) == "full":
        warnings.warn("The full scale is running on a CPU: ViT-B/16 over Imagenette takes hours there. In Colab "
                      "choose Runtime > Change runtime type > GPU, or set SELAGG_MAX_IMAGES to a few hundred.",
                      stacklevel=2)
    return chosen


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def describe(scale_name: str, dev: torch.device) -> str:
    """One line that says which scale, device and library versions a chapter runs with."""
    import timm

    return f"scale={scale_name} device={dev} torch={torch.__version__} timm={timm.__version__}"


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


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs) -> tqdm:
    """A `tqdm.auto` bar, off when `enabled` is False or TQDM_DISABLE is set.

    tqdm's notebook bar ignores TQDM_DISABLE and an explicit `disable=` overrides it everywhere,
    so the package asks here instead of passing `disable=not progress` itself.
    """
    off = os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")  # book builds, tests
    return tqdm(iterable, disable=not enabled or off, **kwargs)


PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """The device asked for, after checking it exists here ('cpu', 'cuda', 'cuda:1', 'mps'); None picks cuda or cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise SelaggError(f"Unknown device {name!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SelaggError(f"Device {name!r} asked for but this machine has no usable CUDA GPU; "
                              "use --device cpu, or run on a machine with a GPU.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SelaggError(f"Device {name!r} does not exist: this machine has {torch.cuda.device_count()} "
                              f"CUDA GPU(s), numbered from 0.")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise SelaggError(f"Device {name!r} asked for but Apple's MPS backend is not available here; use 'cpu'.")
    elif device.type != "cpu":
        raise SelaggError(f"Device {name!r} is not supported by the book; use 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    return device


def half_dtype(dev: torch.device | str) -> torch.dtype | None:
    """The half precision a device runs natively: bfloat16 where it is native, else float16 on CUDA; None on CPU.

    A T4 (compute capability 7.5) only emulates bfloat16, so it gets float16.
    """
    dev = torch.device(dev)
    if dev.type != "cuda":
        return None
    try:
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.3 has no including_emulation and reports native support only
        native_bf16 = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if native_bf16 else torch.float16


def half_precision(device: torch.device) -> str:
    """'fp16' on a CUDA GPU without native bf16 (`half_dtype`: a T4 only emulates it), else 'bf16' (CPUs too)."""
    return "fp16" if half_dtype(device) is torch.float16 else "bf16"


def autocast(device: torch.device, precision: str | torch.dtype | bool | None = None) -> contextlib.AbstractContextManager:
    """torch.autocast in a precision: 'bf16'/'fp16' or a dtype; 'fp32' or False: none; None: the device's native
    half precision (`half_dtype`: bf16, fp16 on a GPU that only emulates bf16, none on a CPU)."""
    device = torch.device(device)
    if precision is None:
        precision = half_dtype(device) or False
    if isinstance(precision, str):
        if precision not in PRECISIONS:
            raise SelaggError(f"Unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
        precision = False if precision == "fp32" else DTYPES[precision]
    if precision is False or precision is True:
        if precision:
            raise SelaggError("autocast=True is ambiguous; pass a dtype (torch.bfloat16), 'bf16'/'fp16', or None.")
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision)


#: The device of each `scaleout.distributed.process_group` standing alone, without torchrun (innermost last).
PROCESS_DEVICES: list[torch.device] = []


def process_device(device: str | torch.device | None = None) -> str | torch.device:
    """`device`, or this process's when None: cuda:LOCAL_RANK in an NCCL process group, the device of a
    process group standing alone, else the CPU. The one place a device None is resolved."""
    if device is not None:
        return device
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local) if dist.get_backend() == "nccl" else torch.device("cpu")
    return PROCESS_DEVICES[-1] if PROCESS_DEVICES else torch.device("cpu")


def synchronize(device: torch.device | str) -> None:
    """Wait until the device has finished the work queued so far (kernels run asynchronously on GPUs)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
