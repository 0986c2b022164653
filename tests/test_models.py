"""Backbone loading: tiny names, timm names offline, clear errors."""
import pytest
import torch

from selagg_utils import SelaggError
from selagg_utils.cache import keys as cache_keys
from selagg_utils.config import scale, settings
from selagg_utils.models import load_backbone, tiny_vit
from selagg_utils.weights import hub


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


def test_offline_mode_refuses_a_download_in_one_sentence_at_once(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(SelaggError, match="offline mode is on.*SELAGG_PRETRAINED=0") as info:
        load_backbone("vit_base_patch16_224.mae", scale="full")
    assert time.perf_counter() - start < 10
    assert info.value._render_traceback_() == [f"SelaggError: {info.value}"]


def test_unreachable_hub_is_one_sentence_without_offline_mode(monkeypatch):
    """Without HF_HUB_OFFLINE the hub client would retry for about 47 s; the check answers first."""
    import timm

    from selagg_utils.weights import network

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("SELAGG_OFFLINE", raising=False)
    asked = []
    monkeypatch.setattr(network, "reachable", lambda host, *a, **k: asked.append(host) or False)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("no download may start"))
    with pytest.raises(SelaggError, match="huggingface.co, which this machine cannot reach"):
        load_backbone("vit_base_patch16_224.mae", scale="full")
    assert asked == ["huggingface.co"]


def test_a_failed_download_after_the_check_is_still_one_sentence(monkeypatch):
    import timm


    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them "
                      "in the cached files. Check your internet connection or see how to run the library in offline mode.")

    monkeypatch.setattr(hub, "check_weights_reachable", lambda arch: None)
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(SelaggError, match="no network connection") as info:
        load_backbone("vit_base_patch16_224.mae", scale="full")
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("typo, suggestion", [("vit_base_patch16_224.maee", "vit_base_patch16_224.mae"),
                                              ("vit_bsae_patch16_224", "vit_base_patch16_224"),
                                              ("tiny-mea", "tiny-mae")])
def test_a_misspelt_name_suggests_close_names(typo, suggestion):
    with pytest.raises(SelaggError, match=f"did you mean '{suggestion}'"):
        load_backbone(typo, scale="full", pretrained=False)


def test_one_resolver_names_every_kind_of_backbone(tmp_path):
    from selagg_utils import models

    kinds = {name: models.resolve_backbone(name, scale="full").kind
             for name in ("tiny-mae", "random:vit_tiny_patch16_224", "vit_tiny_patch16_224")}
    assert kinds == {"tiny-mae": "tiny", "random:vit_tiny_patch16_224": "random", "vit_tiny_patch16_224": "timm"}
    assert models.resolve_backbone(str(models.tiny_checkpoint_path("tiny-jea"))).kind == "file"


def test_the_untrained_control_is_seeded_and_its_seed_is_part_of_its_identity():
    from selagg_utils import models

    a = load_backbone("random:vit_tiny_patch16_224", img_size=32)
    torch.manual_seed(123)  # the caller's random state does not change the control
    b = load_backbone("random:vit_tiny_patch16_224", img_size=32)
    c = load_backbone("random:vit_tiny_patch16_224:1", img_size=32)
    assert torch.equal(a.pos_embed, b.pos_embed) and not torch.equal(a.pos_embed, c.pos_embed)
    ids = [cache_keys.weights_identity(models.resolve_backbone(n)) for n in ("random:vit_tiny_patch16_224", "random:vit_tiny_patch16_224:1")]
    assert ids[0]["seed"] == 0 and ids[1]["seed"] == 1 and ids[0] != ids[1]


def test_a_local_weights_file_for_a_timm_name(tmp_path):
    from safetensors.torch import save_file

    donor = load_backbone("random:vit_tiny_patch16_224:5")
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(path))
    model = load_backbone(f"vit_tiny_patch16_224@{path}")
    assert torch.equal(model.pos_embed, donor.pos_embed)
    with pytest.raises(SelaggError, match="weights.safetensors do not fit the architecture 'vit_small_patch16_224'"):
        load_backbone(f"vit_small_patch16_224@{path}")
    with pytest.raises(SelaggError, match="No weights file"):
        load_backbone(f"vit_tiny_patch16_224@{tmp_path / 'missing.pth'}")


def test_backbones_with_registers_or_without_cls_run_at_224_px():
    from selagg_utils.models import TokenLayout, token_layout

    dinov2 = token_layout(load_backbone("random:vit_small_patch14_reg4_dinov2.lvd142m"))
    assert dinov2 == TokenLayout(True, 4, (16, 16)) and dinov2.num_prefix_tokens == 5 and dinov2.num_tokens == 261
    no_cls = token_layout(load_backbone("random:vit_small_patch16_224", class_token=False, global_pool="avg"))
    assert no_cls.num_prefix_tokens == 0 and not no_cls.has_cls and no_cls.prefix_names == ()


def test_image_cap_and_half_precision_settings(monkeypatch):
    from selagg_utils import config

    monkeypatch.setenv("SELAGG_MAX_IMAGES", "40")
    assert config.settings("full").n_train == config.settings("full").n_eval == 40
    assert config.settings("tiny").n_train == 5000  # the lab's sizes are fixed
    monkeypatch.setenv("SELAGG_MAX_IMAGES", "many")
    with pytest.raises(SelaggError, match="SELAGG_MAX_IMAGES='many'"):
        config.settings("full")
    assert config.half_dtype("cpu") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert config.half_dtype("cuda") == torch.float16  # a T4 emulates bfloat16 only
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert config.half_dtype("cuda") == torch.bfloat16


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
