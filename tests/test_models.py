"""Backbone loading: tiny names, timm names offline, clear errors."""
import pytest
import torch

from selagg_utils import SelaggError
from selagg_utils.config import scale, settings
from selagg_utils.models import load_backbone, tiny_vit


def test_unknown_name_lists_the_choices():
    with pytest.raises(SelaggError, match="tiny-mae.*full scale"):
        load_backbone("tiny-bert")


def test_image_size_the_patch_size_does_not_divide():
    with pytest.raises(SelaggError, match="not divisible by patch size 4"):
        tiny_vit(img_size=30)


def test_timm_architecture_builds_offline_without_weights():
    model = load_backbone("vit_tiny_patch16_224", pretrained=False, img_size=64)
    assert model.forward_features(torch.zeros(1, 3, 64, 64)).shape == (1, 17, 192)


def test_timm_weights_need_full_scale():
    with pytest.raises(SelaggError, match="full scale"):
        load_backbone("vit_base_patch16_224.mae", scale="tiny", pretrained=True)


def test_full_scale_without_network_is_one_sentence(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them "
                      "in the cached files. Check your internet connection or see how to run the library in offline mode.")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(SelaggError, match="no network connection") as info:
        load_backbone("vit_base_patch16_224.mae", scale="full")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert info.value._render_traceback_() == [f"SelaggError: {info.value}"]


def test_non_vit_timm_model_is_refused():
    with pytest.raises(SelaggError, match="not a timm VisionTransformer"):
        load_backbone("resnet18", pretrained=False)


def test_scale_resolution(monkeypatch):
    monkeypatch.delenv("SELAGG_SCALE", raising=False)
    assert scale() == "tiny" and settings().mim == "tiny-mae"
    monkeypatch.setenv("SELAGG_SCALE", "full")
    assert scale() == "full" and settings().mim == "vit_base_patch16_224.mae"
    with pytest.raises(SelaggError, match="Unknown scale"):
        scale("huge")


def test_random_control_of_a_timm_architecture_needs_no_weights():
    model = load_backbone("random:vit_tiny_patch16_224", scale="full", img_size=32)
    assert model.forward_features(torch.zeros(1, 3, 32, 32)).shape == (1, 5, 192)
