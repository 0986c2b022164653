"""The two pretraining recipes: shapes, masking, and a few steps that lower the loss."""
import pytest
import torch

from selagg_utils.data import DigitStream
from selagg_utils.models import tiny_vit
from selagg_utils.pretrain import (
    ContrastiveJEA,
    MaskedAutoencoder,
    TrainOptions,
    info_nce,
    mean_fill_baseline,
    patchify,
    random_masking,
    random_views,
    train_steps,
    unpatchify,
)


def test_patchify_round_trip_and_order():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    p = patchify(x, 4)
    assert p.shape == (2, 4, 16)
    assert torch.equal(p[0, 1], x[0, 0, :4, 4:].reshape(-1))  # second patch = top-right block
    assert torch.equal(unpatchify(p, 4, 1), x)


def test_random_masking_hides_the_ratio():
    keep, hidden = random_masking(3, 64, 0.75, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (3, 16) and hidden.sum(1).tolist() == [48.0] * 3
    assert (hidden.gather(1, keep) == 0).all()


def test_mean_fill_baseline_keeps_visible_patches():
    x = torch.rand(2, 1, 8, 8)
    _, hidden = random_masking(2, 4, 0.5)
    filled = mean_fill_baseline(x, hidden, 4)
    assert torch.equal(patchify(filled, 4)[hidden == 0], patchify(x, 4)[hidden == 0])


def test_info_nce_prefers_matching_pairs():
    z = torch.randn(8, 16)
    assert info_nce(z, z) < info_nce(z, torch.randn(8, 16))


def test_views_keep_shape_and_differ():
    x = torch.rand(4, 1, 32, 32)
    g = torch.Generator().manual_seed(0)
    v1, v2 = random_views(x, g), random_views(x, g)
    assert v1.shape == x.shape and not torch.allclose(v1, v2)


def _few_steps(model, steps=30):
    torch.manual_seed(0)
    history = train_steps(model, DigitStream(32, seed=0), steps, TrainOptions(lr=2e-3, warmup=3, progress=False))
    first = sum(r["loss"] for r in history[:5]) / 5
    last = sum(r["loss"] for r in history[-5:]) / 5
    return first, last


@pytest.mark.slow
def test_mae_loss_decreases():
    torch.manual_seed(0)
    first, last = _few_steps(MaskedAutoencoder(tiny_vit(depth=2)))
    assert last < 0.8 * first


@pytest.mark.slow
def test_jea_loss_decreases():
    torch.manual_seed(0)
    first, last = _few_steps(ContrastiveJEA(tiny_vit(depth=2)))
    assert last < first - 0.1


def test_patch_statistics_loss_trains_the_stats_head_but_not_the_encoder_or_decoder():
    torch.manual_seed(0)
    mae = MaskedAutoencoder(tiny_vit(depth=2))
    out = mae(torch.rand(4, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    out["stats_loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mae.decoder.stats.parameters())
    others = [p for n, p in mae.named_parameters() if not n.startswith("decoder.stats.")]
    assert all(p.grad is None or not p.grad.any() for p in others)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mae", "jea"])
def test_the_pretraining_script_writes_a_loadable_checkpoint_whose_manifest_describes_the_model(method, tmp_path):
    """`make checkpoints` in miniature: one step of the real script, into a temporary folder, never the shipped ones."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from selagg_utils.models import load_backbone, tiny_checkpoint_path
    from selagg_utils.weights.files import vit_config
    from selagg_utils.weights.training import DEFAULTS

    root = Path(__file__).resolve().parents[1]
    shipped = tiny_checkpoint_path(f"tiny-{method}").read_bytes()
    done = subprocess.run([sys.executable, str(root / "scripts" / "pretrain_tiny.py"), "--method", method, "--steps", "1",
                           "--batch-size", "8", "--threads", "1", "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    path = tmp_path / f"tiny-{method}.safetensors"
    model, manifest = load_backbone(path), json.loads(path.with_suffix(".json").read_text())
    assert manifest["model_config"] == vit_config(model) == vit_config(load_backbone(f"tiny-{method}"))
    assert manifest["training_recipe"]["steps"] == 1 and manifest["images_seen"] == 8
    assert manifest["training_recipe"]["lr"] == DEFAULTS[method]["lr"]  # no --lr: the method's own
    if method == "mae":  # the decoder's recorded shape rebuilds the shipped decoder
        assert manifest["decoder_config"] | {"stats_head": None} == json.loads(
            tiny_checkpoint_path("tiny-mae").with_suffix(".json").read_text())["decoder_config"] | {"stats_head": None}
    assert tiny_checkpoint_path(f"tiny-{method}").read_bytes() == shipped  # the shipped checkpoint is untouched


def test_pretraining_with_options_given_records_the_options_used(tmp_path):
    import json
    from dataclasses import replace

    from selagg_utils import SelaggError
    from selagg_utils.models import tiny_checkpoint_path
    from selagg_utils.weights.training import method_options, pretrain_tiny

    shipped = tiny_checkpoint_path("tiny-jea").read_bytes()
    assert method_options("mae", "cpu") == TrainOptions(lr=1.5e-3, device=torch.device("cpu"))
    options = replace(method_options("jea", "cpu"), lr=2e-3, seed=3, warmup=1, weight_decay=0.1, progress=False)
    manifest = pretrain_tiny("jea", steps=2, batch_size=8, options=options, out_dir=tmp_path)
    recipe = json.loads((tmp_path / "tiny-jea.json").read_text())["training_recipe"]
    assert recipe == manifest["training_recipe"]
    assert (recipe["lr"], recipe["seed"], recipe["weight_decay"]) == (2e-3, 3, 0.1)
    assert recipe["schedule"] == "1 warm-up step, cosine to lr/100" and manifest["images_seen"] == 16
    assert tiny_checkpoint_path("tiny-jea").read_bytes() == shipped
    with pytest.raises(SelaggError, match="Unknown pretraining method 'dino'"):
        method_options("dino")
    with pytest.raises(SelaggError, match="TrainOptions"):
        pretrain_tiny("jea", 1, 8, {"lr": 1e-3}, out_dir=tmp_path)
