"""Two small self-supervised recipes for the tiny ViT: a masked autoencoder and a contrastive JEA.

Both use timm's VisionTransformer as the encoder, so everything downstream treats them exactly like
the real `vit_base_patch16_224.mae` / `.dino` checkpoints.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.data import Dataset

from .checks import SelaggError
from .config import progress_bar
from .extraction import ExtractOptions
from .features import pooled_features
from .linear_eval import knn_accuracy, logistic_probe_accuracy
from .models import load_checkpoint, sub_state, tiny_checkpoint_path, tiny_vit

__all__ = ["patchify", "unpatchify", "random_masking", "MaeDecoder", "MaskedAutoencoder", "random_views",
           "info_nce", "ContrastiveJEA", "TrainOptions", "train_steps", "probe_report", "load_tiny_mae",
           "reconstruction_report"]


# ----------------------------------------------------------------------------- patches
def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order like the ViT's tokens."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)  # (B, C, gh, p, gw, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, H, W) for a square grid; the inverse of `patchify`."""
    b, n, _ = patches.shape
    g, p = math.isqrt(n), patch_size
    x = patches.reshape(b, g, g, p, p, channels)  # (B, gh, gw, p, p, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, g * p, g * p)


def random_masking(batch: int, num_patches: int, mask_ratio: float, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of the kept patches (B, n_keep), `hidden` (B, N): 1 where MAE hides a patch), uniformly at random."""
    n_keep = max(1, int(round(num_patches * (1 - mask_ratio))))
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    order = noise.argsort(dim=1)
    keep = order[:, :n_keep]
    hidden = torch.ones(batch, num_patches, device=device)
    hidden.scatter_(1, keep, 0.0)
    return keep, hidden


# ----------------------------------------------------------------------------- MAE
class MaeDecoder(nn.Module):
    """A light Transformer that fills in the hidden patches from the encoder's visible tokens.

    Besides the normalised pixels of each patch (MAE's target), a small `stats` head predicts the
    patch's mean and standard deviation, so reconstructions can be shown in pixels without peeking at
    the target. It reads the decoder's features detached: the encoder learns from MAE's loss alone.
    """

    def __init__(self, embed_dim: int, num_patches: int, patch_dim: int, dim: int = 128, depth: int = 2,
                 num_heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_dim)  # normalised pixels
        self.stats = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 2))  # (mean, std) of the patch
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, keep: torch.Tensor, num_patches: int) -> torch.Tensor:
        """Encoder tokens ([cls] + visible) -> per-patch predictions (B, N, patch_dim + 2)."""
        x = self.embed(latent)
        b, d = x.shape[0], x.shape[-1]
        full = self.mask_token.expand(b, num_patches, d).clone()
        full.scatter_(1, keep[..., None].expand(-1, -1, d), x[:, 1:])  # visible tokens back in place
        x = torch.cat([x[:, :1], full], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))[:, 1:]
        return torch.cat([self.pred(x), self.stats(x.detach())], dim=-1)


class MaskedAutoencoder(nn.Module):
    """MAE (He et al., 2022) around a timm ViT: encode the visible 25%, decode all, score the hidden."""

    def __init__(self, encoder: VisionTransformer, mask_ratio: float = 0.75, decoder_dim: int = 128,
                 decoder_depth: int = 2, decoder_heads: int = 4, norm_eps: float = 1e-2, stats_weight: float = 1.0):
        super().__init__()
        self.encoder, self.mask_ratio = encoder, mask_ratio
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.channels = encoder.patch_embed.proj.in_channels
        self.num_patches = encoder.patch_embed.num_patches
        self.decoder = MaeDecoder(encoder.embed_dim, self.num_patches, self.patch_size ** 2 * self.channels,
                                  decoder_dim, decoder_depth, decoder_heads)
        self.norm_eps, self.stats_weight = norm_eps, stats_weight

    def encode_visible(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """[cls] + the kept patch tokens through the encoder: (B, 1 + n_keep, D)."""
        enc = self.encoder
        x = enc.patch_embed(images) + enc.pos_embed[:, enc.num_prefix_tokens:]
        x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = enc.norm_pre(torch.cat([cls, x], dim=1))
        return enc.norm(enc.blocks(x))

    def targets(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per patch: normalised pixels (B, N, P), mean (B, N) and std (B, N)."""
        patches = patchify(images, self.patch_size)
        mean, std = patches.mean(-1), patches.std(-1)
        return (patches - mean[..., None]) / (std[..., None] ** 2 + self.norm_eps).sqrt(), mean, std

    def forward(self, images: torch.Tensor, mask_ratio: float | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Loss terms on the hidden patches, the pixel reconstruction and `hidden` (B, N), 1 where a patch was hidden."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        keep, hidden = random_masking(images.shape[0], self.num_patches, ratio, images.device, generator)
        out = self.decoder(self.encode_visible(images, keep), keep, self.num_patches)
        pred_norm, pred_mean, pred_std = out[..., :-2], out[..., -2], out[..., -1]
        target, mean, std = self.targets(images)
        n_hidden = hidden.sum().clamp_min(1)
        pixel_loss = (((pred_norm - target) ** 2).mean(-1) * hidden).sum() / n_hidden
        stats_loss = (((pred_mean - mean) ** 2 + (pred_std - std) ** 2) * hidden).sum() / n_hidden
        recon = pred_norm * (pred_std.clamp_min(0)[..., None] ** 2 + self.norm_eps).sqrt() + pred_mean[..., None]
        return {"loss": pixel_loss + self.stats_weight * stats_loss, "norm_pix_loss": pixel_loss,
                "stats_loss": stats_loss, "reconstruction": unpatchify(recon, self.patch_size, self.channels),
                "hidden": hidden}


def mean_fill_baseline(images: torch.Tensor, hidden: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Each hidden patch (`hidden` (B, N), 1 = hidden) filled with the mean of the image's visible pixels (a
    model-free baseline)."""
    patches = patchify(images, patch_size)
    visible = (1 - hidden)[..., None]
    fill = (patches * visible).sum((1, 2)) / (visible.sum((1, 2)) * patches.shape[-1])
    filled = torch.where(hidden[..., None].bool(), fill[:, None, None].expand_as(patches), patches)
    return unpatchify(filled, patch_size, images.shape[1])


def hidden_patch_mse(prediction: torch.Tensor, images: torch.Tensor, hidden: torch.Tensor, patch_size: int) -> float:
    """Mean squared error in pixels over the hidden patches only (`hidden` (B, N), 1 = hidden)."""
    err = ((patchify(prediction, patch_size) - patchify(images, patch_size)) ** 2).mean(-1)
    return float((err * hidden).sum() / hidden.sum())


# ----------------------------------------------------------------------------- contrastive JEA
def random_views(images: torch.Tensor, generator: torch.Generator | None = None, min_area: float = 0.4,
                 max_noise: float = 0.05) -> torch.Tensor:
    """A random augmented view of each image: resized crop, brightness/contrast jitter, noise."""
    b, device = images.shape[0], images.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator, device=device)

    area, log_ratio = uniform(min_area, 1.0), uniform(math.log(3 / 4), math.log(4 / 3))
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx, cy = uniform(-1, 1) * (1 - w), uniform(-1, 1) * (1 - h)
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast, brightness = uniform(0.6, 1.4)[:, None, None, None], uniform(-0.1, 0.1)[:, None, None, None]
    mean = views.mean((1, 2, 3), keepdim=True)
    views = (views - mean) * contrast + mean + brightness
    noise = torch.randn(views.shape, generator=generator, device=device)
    return views + noise * uniform(0.0, max_noise)[:, None, None, None]


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Symmetric InfoNCE (NT-Xent): each view must pick its partner among the other 2B - 1 embeddings."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    b = z1.shape[0]
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, partner)


class ContrastiveJEA(nn.Module):
    """A joint-embedding model trained through [cls]: two views of an image must agree (SimCLR / MoCo v3 style).

    `min_area` is the smallest share of the image a view's crop keeps (1.0: no cropping).
    """

    def __init__(self, encoder: VisionTransformer, proj_dim: int = 128, hidden: int = 512, temperature: float = 0.2,
                 min_area: float = 0.4):
        super().__init__()
        self.encoder, self.temperature, self.min_area = encoder, temperature, min_area
        d = encoder.embed_dim
        self.projector = nn.Sequential(nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                       nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                       nn.Linear(hidden, proj_dim))

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """InfoNCE between the projected [cls] embeddings of two random views."""
        v1, v2 = (random_views(images, generator, min_area=self.min_area) for _ in range(2))
        z = self.projector(self.encoder(torch.cat([v1, v2])))  # encoder(x) is the [cls] output
        z1, z2 = z.chunk(2)
        return {"loss": info_nce(z1, z2, self.temperature)}


# ----------------------------------------------------------------------------- training loop
@dataclass(frozen=True)
class TrainOptions:
    """How `train_steps` trains: AdamW's peak learning rate, weight decay and betas, the warm-up steps (None: one
    step in 20, at least one), the device, the seed of the masks and views drawn, and whether to show progress."""

    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    device: torch.device | str = "cpu"
    seed: int = 0
    progress: bool = True


def train_steps(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int,
                options: TrainOptions = TrainOptions()) -> list[dict]:
    """AdamW with warm-up and cosine decay (timm's), for a fixed number of steps; returns the loss history."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    o = options
    lr, device = o.lr, o.device
    model.to(device).train()
    generator = torch.Generator(device=device).manual_seed(o.seed)
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=o.weight_decay, betas=o.betas)
    warmup = max(1, steps // 20) if o.warmup is None else o.warmup
    schedule = CosineLRScheduler(optimizer, t_initial=steps, warmup_t=warmup, warmup_lr_init=lr / 100,
                                 lr_min=lr / 100, t_in_epochs=False)
    history, start = [], time.perf_counter()
    bar = progress_bar(range(steps), enabled=o.progress, desc=type(model).__name__, mininterval=2.0)
    for step in bar:
        schedule.step_update(step)
        images, _ = next(batches)
        out = model(images.to(device), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        row = {"step": step, "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start,
               **{k: float(v.detach()) for k, v in out.items() if v.ndim == 0}}
        history.append(row)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{row['loss']:.4f}")
    model.eval()
    return history


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
