"""Evidence that a tiny backbone learned: k-NN and linear probes, and MAE reconstruction error."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .checkpoints import load_checkpoint, sub_state
from .features import extract_tokens
from .models import load_backbone, num_prefix_tokens, tiny_checkpoint_path, tiny_vit
from .pretrain import MaskedAutoencoder, hidden_patch_mse, mean_fill_baseline
from .probing import knn_accuracy, logistic_probe_accuracy


def cls_and_mean_features(tokens: torch.Tensor, n_prefix: int = 1) -> dict[str, torch.Tensor]:
    """The [cls] output and the mean of the patch tokens, from (N, T, D) tokens."""
    return {"cls": tokens[:, 0], "mean": tokens[:, n_prefix:].mean(1)}


def probe_report(name: str, train: Dataset, test: Dataset, device: str | torch.device = "cpu") -> dict[str, float]:
    """k-NN and logistic-regression test accuracy on [cls] and on mean-pooled patches for one backbone."""
    model = load_backbone(name, device=device)
    n_prefix = num_prefix_tokens(model)
    tr_tokens, tr_y = extract_tokens(model, train, device=device)
    te_tokens, te_y = extract_tokens(model, test, device=device)
    tr, te = cls_and_mean_features(tr_tokens, n_prefix), cls_and_mean_features(te_tokens, n_prefix)
    report = {}
    for kind in ("cls", "mean"):
        report[f"knn_{kind}"] = knn_accuracy(tr[kind], tr_y, te[kind], te_y)
        report[f"linear_{kind}"] = logistic_probe_accuracy(tr[kind], tr_y, te[kind], te_y)
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
    model_mse = hidden_patch_mse(out["reconstruction"], images, out["mask"], mae.patch_size)
    base = mean_fill_baseline(images, out["mask"], mae.patch_size)
    baseline_mse = hidden_patch_mse(base, images, out["mask"], mae.patch_size)
    return {"mae_mse": model_mse, "baseline_mse": baseline_mse, "ratio": model_mse / baseline_mse}
