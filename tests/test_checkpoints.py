"""Checkpoint files: bit-exact round trip, hash verification, clear errors."""
import json

import pytest
import torch

from selagg_utils import SelaggError
from selagg_utils.checks import manifest_path
from selagg_utils.config import TINY_NAMES
from selagg_utils.models import TINY_CONFIG, load_backbone, load_checkpoint, model_from_checkpoint, tiny_vit
from selagg_utils.weights.files import save_checkpoint


def _save_tiny(path, **config):
    model = tiny_vit(**config)
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    save_checkpoint(path, state, {"name": "test", "model_config": {**TINY_CONFIG, **config}})
    return model


def test_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = _save_tiny(tmp_path / "m.safetensors", depth=2)
    loaded = model_from_checkpoint(tmp_path / "m.safetensors")
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(model.eval()(x), loaded(x))


def test_tampered_weights_are_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    _save_tiny(path, depth=1)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SelaggError, match="does not match its manifest"):
        load_checkpoint(path)


def test_missing_manifest_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    _save_tiny(path, depth=1)
    manifest_path(path).unlink()
    with pytest.raises(SelaggError, match="no manifest"):
        load_backbone(path)


def test_shapes_that_do_not_fit_the_config(tmp_path):
    path = tmp_path / "m.safetensors"
    _save_tiny(path, depth=1)
    manifest = json.loads(manifest_path(path).read_text())
    manifest["model_config"]["embed_dim"] = 64  # the manifest now describes another model
    manifest_path(path).write_text(json.dumps(manifest))
    with pytest.raises(SelaggError, match="do not fit"):
        load_backbone(path)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_shipped_checkpoints_verify_and_load(name):
    model = load_backbone(name)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    out = model.forward_features(torch.zeros(1, 1, 32, 32))
    assert out.shape == (1, 65, 128)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_shipped_manifests_record_the_recipe(name):
    from selagg_utils.models import tiny_checkpoint_path

    manifest = json.loads(manifest_path(tiny_checkpoint_path(name)).read_text())
    for field in ("model_config", "sha256", "data_recipe", "training_recipe", "epochs", "wall_time_s", "device",
                  "final_loss", "code_version"):
        assert field in manifest
    assert tiny_checkpoint_path(name).stat().st_size <= 10 * 2**20
