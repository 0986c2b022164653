"""Short pretraining runs that test one change to the lab's recipe at a time (book/lab_recipe.md).

    python scripts/lab_experiment.py --method mae --steps 400 --out /tmp/lab/ref --threads 1
    python scripts/lab_experiment.py --method mae --steps 400 --no-cls-decoder --out /tmp/lab/nocls
    python scripts/lab_experiment.py --eval selagg_utils/checkpoints/tiny-mae.safetensors --out /tmp/lab/shipped

Each run trains a tiny backbone (or loads one with --eval), then measures on the test split, per
block, the [cls]→patch entropy / ln N, the share of [cls]→patch attention on the digit and the
[cls] self-attention, and on last-block tokens the logistic-regression accuracy of [cls], of the
patch mean and of the mean over the digit's patches, and an AbMILP head. Writes result.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from selagg_utils import probing
from selagg_utils.attention import attention_statistics  # noqa: E402
from selagg_utils.data import DigitsRecipe, DigitStream, cluttered_digits
from selagg_utils.features import TokenSet  # noqa: E402
from selagg_utils.linear_eval import logistic_probe_accuracy  # noqa: E402
from selagg_utils.models import model_from_checkpoint, tiny_vit, token_layout  # noqa: E402
from selagg_utils.weights.files import vit_config  # noqa: E402
from selagg_utils.pretrain import ContrastiveJEA, MaeDecoder, MaskedAutoencoder, TrainOptions, train_steps  # noqa: E402
from selagg_utils.weights.files import save_checkpoint

STATS = ("cls_patch_entropy_norm", "cls_object_share", "cls_self")


class DecoderWithoutCls(MaeDecoder):
    """MAE's decoder with the [cls] token replaced by zeros, so [cls] receives no gradient at all."""

    def forward(self, latent: torch.Tensor, keep: torch.Tensor, num_patches: int) -> torch.Tensor:
        latent = torch.cat([torch.zeros_like(latent[:, :1]), latent[:, 1:]], dim=1)
        return super().forward(latent, keep, num_patches)


def build_model(args: argparse.Namespace, encoder) -> torch.nn.Module:
    """The pretraining wrapper for one experiment."""
    if args.method == "jea":
        return ContrastiveJEA(encoder)
    mae = MaskedAutoencoder(encoder, mask_ratio=args.mask_ratio, norm_eps=args.norm_eps)
    if args.no_cls_decoder:
        old = mae.decoder
        mae.decoder = DecoderWithoutCls(encoder.embed_dim, mae.num_patches, old.pred.out_features)
    return mae


def last_block_tokens(model, images: torch.Tensor, labels: torch.Tensor) -> TokenSet:
    """Final-norm tokens of every image, as a TokenSet."""
    with torch.inference_mode():
        tokens = torch.cat([model.forward_features(images[i:i + 500]) for i in range(0, len(images), 500)])
    return TokenSet(tokens.clone(), labels.clone(), token_layout(model))


def object_mean(tokens: TokenSet, masks: torch.Tensor) -> torch.Tensor:
    """Mean of the patch tokens on the digit's patches (object masks as an oracle), (N, D)."""
    w = masks.flatten(1).float()
    return (tokens.patches.float() * w[..., None]).sum(1) / w.sum(1, keepdim=True)


def measure(model, recipe: DigitsRecipe, abmilp_epochs: int) -> dict:
    """Per-block attention statistics and probes on the test split."""
    model.eval()
    test = cluttered_digits("test", 1500, recipe=recipe)
    loader = torch.utils.data.DataLoader(test.with_object_masks(), batch_size=250)
    stats = attention_statistics(model, loader, progress=False)
    out = {s: [round(float(v), 3) for v in stats[s]] for s in STATS}
    train = cluttered_digits("train", 4000, recipe=recipe)
    val = cluttered_digits("val", 1000, recipe=recipe)
    tr, va, te = (last_block_tokens(model, d.images, d.labels) for d in (train, val, test))
    feats = {"cls": lambda t, d: t.cls, "mean": lambda t, d: t.mean_patches,
             "object_mean": lambda t, d: object_mean(t, d.object_masks)}
    for name, f in feats.items():
        out[f"logreg_{name}"] = round(logistic_probe_accuracy(f(tr, train), tr.labels, f(te, test), te.labels), 3)
    if abmilp_epochs:
        probe = probing.ProbeRecipe(epochs=abmilp_epochs, warmup_epochs=2, batch_size=256, optimizer="adamw",
                                    lrs=(1e-3, 3e-3, 1e-2))
        res = probing.train_probes("abmilp", tr, va, te, probe, seeds=(0,))[0]
        out["abmilp"] = round(res.test, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=("mae", "jea"), default="mae")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=None, help="default: 1.5e-3 MAE, 1e-3 JEA")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--norm-eps", type=float, default=1e-2)
    p.add_argument("--no-cls-decoder", action="store_true", help="[cls] does not enter MAE's decoder")
    p.add_argument("--noise-std", type=float, default=None, help="canvas noise (default: the recipe's)")
    p.add_argument("--eval", type=Path, default=None, help="measure this checkpoint instead of training")
    p.add_argument("--abmilp-epochs", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = DigitsRecipe() if args.noise_std is None else replace(DigitsRecipe(), noise_std=args.noise_std)
    start, result = time.perf_counter(), {"args": {k: str(v) for k, v in vars(args).items()}}
    if args.eval:
        model = model_from_checkpoint(args.eval)
    else:
        torch.manual_seed(0)
        model = tiny_vit()
        wrapper = build_model(args, model)
        lr = args.lr or (1.5e-3 if args.method == "mae" else 1e-3)
        history = train_steps(wrapper, DigitStream(256, recipe=recipe), args.steps,
                              TrainOptions(lr=lr, progress=False))
        result["final_loss"] = round(sum(r["loss"] for r in history[-20:]) / 20, 4)
        result["train_s"] = round(time.perf_counter() - start, 1)
        state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
        save_checkpoint(args.out / "backbone.safetensors", state, {"model_config": vit_config(model)})
        print(json.dumps(result), flush=True)
    result.update(measure(model, recipe, args.abmilp_epochs))
    result["total_s"] = round(time.perf_counter() - start, 1)
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
