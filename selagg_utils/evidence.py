"""Evidence that a tiny backbone learned: k-NN and linear probes, and MAE reconstruction error."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .checkpoints import load_checkpoint, sub_state
from .errors import SelaggError
from .extraction import ExtractOptions
from .features import pooled_features
from .models import tiny_checkpoint_path, tiny_vit
from .pretrain import MaskedAutoencoder, hidden_patch_mse, mean_fill_baseline
from .linear_eval import knn_accuracy, logistic_probe_accuracy

__all__ = ["probe_report", "load_tiny_mae", "reconstruction_report"]


def probe_report(name: str, train: Dataset, test: Dataset, device: str | torch.device = "cpu") -> dict[str, float]:
    """k-NN and logistic-regression test accuracy on [cls] and on mean-pooled patches for one backbone.

    The features are pooled batch by batch and cached (`features.pooled_features`): no split's tokens
    are ever held in memory, which matters at full scale.
    """
    tr, te = (pooled_features(name, split, options=ExtractOptions(device=device)) for split in (train, test))
    if tr.cls is None:
        raise SelaggError(f"{name} has no [cls] token, so this report's [cls] probes cannot run; compare its "
                          "mean-pooled features (features.pooled_features) instead.")
    report = {}
    for kind, a, b in (("cls", tr.cls, te.cls), ("mean", tr.mean, te.mean)):
        report[f"knn_{kind}"] = knn_accuracy(a, tr.labels, b, te.labels)
        report[f"linear_{kind}"] = logistic_probe_accuracy(a, tr.labels, b, te.labels)
    return report


def load_tiny_mae() -> MaskedAutoencoder:
    """The shipped tiny MAE with its decoder (for reconstructions), in eval mode."""
    state, manifest = load_checkpoint(tiny_checkpoint_path("tiny-mae"))
    cfg = manifest["decoder_config"]
    mae = MaskedAutoencoder(tiny_vit(**manifest["model_config"]), mask_ratio=cfg["mask_ratio"], decoder_dim=cfg["dim"],
                            decoder_depth=cfg["depth"], decoder_heads=cfg["num_heads"], norm_eps=cfg["norm_eps"],
                            stats_weight=cfg["stats_weight"])
    mae.encoder.load_state_dict(sub_state(state, "backbone"))
    mae.decoder.load_state_dict(sub_state(state, "decoder"))
    return mae.eval()


@torch.inference_mode()
def reconstruction_report(mae: MaskedAutoencoder, images: torch.Tensor, mask_ratio: float = 0.75,
                          seed: int = 0) -> dict[str, float]:
    """Pixel MSE on hidden patches: the MAE vs filling each hidden patch with the visible pixels' mean."""
    out = mae(images, mask_ratio=mask_ratio, generator=torch.Generator().manual_seed(seed))
    model_mse = hidden_patch_mse(out["reconstruction"], images, out["hidden"], mae.patch_size)
    base = mean_fill_baseline(images, out["hidden"], mae.patch_size)
    baseline_mse = hidden_patch_mse(base, images, out["hidden"], mae.patch_size)
    return {"mae_mse": model_mse, "baseline_mse": baseline_mse, "ratio": model_mse / baseline_mse}
