"""One call that trains a tiny backbone and writes its checkpoint and manifest (used by scripts/)."""
from __future__ import annotations

import subprocess
import time
from dataclasses import replace
from pathlib import Path

import timm
import torch

from .. import __version__
from ..bench.hardware import device_name
from ..checks import SelaggError, options_object
from ..config import device as pick_device
from ..config import resolve_device
from ..data import DigitsRecipe, DigitStream
from ..models import CHECKPOINT_DIR, tiny_vit
from ..pretrain import ContrastiveJEA, MaskedAutoencoder, TrainOptions, train_steps
from .files import save_checkpoint, vit_config

__all__ = ["method_options", "pretrain_tiny"]

DEFAULTS = {"mae": {"steps": 2400, "lr": 1.5e-3}, "jea": {"steps": 600, "lr": 1e-3}, "random": {"steps": 0, "lr": 0.0}}


def code_version() -> str:
    """Package version plus the git commit of the working tree, when there is one."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def method_options(method: str, device: str | torch.device | None = None) -> TrainOptions:
    """The options `pretrain_tiny` trains a method with unless given others: the method's peak learning rate
    (`DEFAULTS`), seed 0, progress shown, on `device` (None: CUDA if present, else the CPU)."""
    if method not in DEFAULTS:
        raise SelaggError(f"Unknown pretraining method {method!r}; choose one of {', '.join(DEFAULTS)}.")
    return TrainOptions(lr=DEFAULTS[method]["lr"], device=resolve_device(device))


def warm_up_words(options: TrainOptions) -> str:
    """How the manifest names the warm-up `train_steps` makes with these options."""
    if options.warmup is None:
        return "5% warm-up"
    return f"{options.warmup} warm-up step{'' if options.warmup == 1 else 's'}"


def pretrain_tiny(method: str, steps: int | None = None, batch_size: int = 256, options: TrainOptions | None = None,
                  *, threads: int | None = None, out_dir: Path | None = None) -> dict:
    """Train `tiny-<method>` and save it; returns the manifest that was written.

    `options` None means `method_options(method)`; options given are used as they are, their learning
    rate included (start from `replace(method_options(method), seed=1)` to keep the method's).
    """
    defaults = method_options(method)  # refuses an unknown method
    options = options_object(options, TrainOptions, "options", f"pretrain_run.method_options({method!r})", defaults)
    if threads:
        torch.set_num_threads(threads)
    steps = DEFAULTS[method]["steps"] if steps is None else steps
    options = replace(options, device=pick_device(options.device))
    lr, dev, seed = options.lr, options.device, options.seed
    torch.manual_seed(seed)
    encoder = tiny_vit()
    recipe = DigitsRecipe()
    model = {"mae": lambda: MaskedAutoencoder(encoder), "jea": lambda: ContrastiveJEA(encoder),
             "random": lambda: None}[method]()
    start, history = time.perf_counter(), []
    if model is not None:
        history = train_steps(model, DigitStream(batch_size, seed=seed, recipe=recipe), steps, options)
    wall = time.perf_counter() - start
    state = {f"backbone.{k}": v for k, v in encoder.state_dict().items()}
    if method == "mae":
        state.update({f"decoder.{k}": v for k, v in model.decoder.state_dict().items()})
    tail = history[-50:]
    manifest = {
        "name": f"tiny-{method}",
        "method": {"mae": "masked autoencoder (MAE)", "jea": "contrastive joint-embedding (InfoNCE on [cls])",
                   "random": "untrained control (random initialisation)"}[method],
        "model_config": vit_config(encoder),
        "decoder_config": ({"dim": model.decoder.embed.out_features, "depth": len(model.decoder.blocks),
                            "num_heads": model.decoder.blocks[0].attn.num_heads, "mask_ratio": model.mask_ratio,
                            "norm_eps": model.norm_eps, "stats_weight": model.stats_weight,
                            "stats_head": "MLP on the decoder's features, detached (does not train the encoder)"}
                           if method == "mae" else None),
        "data_recipe": {"dataset": "cluttered-digits, fresh images every batch from the train source digits",
                        **recipe.to_dict()},
        "training_recipe": {"steps": steps, "batch_size": batch_size, "optimizer": "AdamW (timm)", "lr": lr,
                            "betas": list(options.betas), "weight_decay": options.weight_decay,
                            "schedule": f"{warm_up_words(options)}, cosine to lr/100",
                            "seed": seed, **({"temperature": model.temperature, "views": "random resized crop "
                                              "(area 0.4-1), brightness/contrast jitter, noise"} if method == "jea" else {})},
        "images_seen": steps * batch_size,
        "epochs": round(steps * batch_size / 10_000, 1),
        "epochs_note": "epochs-equivalent: images seen / 10,000 (the default train split size)",
        "wall_time_s": round(wall, 1),
        "device": device_name(dev),
        "final_loss": round(sum(r["loss"] for r in tail) / len(tail), 4) if tail else None,
        "loss_curve": [[r["step"], round(r["loss"], 4)] for r in history[:: max(1, len(history) // 100)]],
        "code_version": code_version(),
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if method == "mae":
        manifest["final_norm_pix_loss"] = round(sum(r["norm_pix_loss"] for r in tail) / len(tail), 4)
    out = Path(out_dir or CHECKPOINT_DIR)
    return save_checkpoint(out / f"tiny-{method}.safetensors", state, manifest)
