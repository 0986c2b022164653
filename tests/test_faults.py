"""Faults a reader can cause, each ending in the right result or in the package's one sentence."""
import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from selagg_utils import SelaggError
from selagg_utils.attention import attention_statistics
from selagg_utils.features import TokenSet
from selagg_utils.heads import MeanPool, ScorerOptions, make_head
from selagg_utils.linear_eval import knn_accuracy, logistic_probe_accuracy, ridge_accuracy
from selagg_utils.models import (
    TINY_CONFIG,
    TokenLayout,
    load_backbone,
    load_checkpoint,
    model_from_checkpoint,
    tiny_vit,
)
from selagg_utils.probing import ProbeRecipe, low_shot_indices, train_probe, train_probes
from selagg_utils.weights.files import save_checkpoint


def toy(n: int, seed: int) -> TokenSet:
    """Tokens (n, 5, 8) that all carry the class (3 classes)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    x = torch.randn(n, 5, 8, generator=g)
    x[:, :, :3] += 4 * torch.nn.functional.one_hot(labels, 3)[:, None]
    return TokenSet(x.half(), labels, TokenLayout(True, 0, (2, 2)))


QUICK = dict(epochs=2, warmup_epochs=0, batch_size=16)


# ----------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("fields, words", [
    ({"epochs": 0}, "epochs=0"), ({"epochs": 2.5}, "epochs=2.5"), ({"epochs": True}, "epochs=True"),
    ({"warmup_epochs": -1}, "warmup_epochs=-1"), ({"epochs": 5, "warmup_epochs": 6}, "longer than epochs"),
    ({"batch_size": 1}, "batch_size=1"), ({"lrs": ()}, "non-empty sequence"), ({"lrs": 0.1}, "non-empty sequence"),
    ({"lrs": (0.1, -1.0)}, "learning rate -1.0 in lrs"), ({"lrs": (0.0,)}, "learning rate 0.0 in lrs"),
    ({"lrs": (float("nan"),)}, "learning rate nan in lrs"), ({"lrs": (float("inf"),)}, "learning rate inf in lrs"),
    ({"lrs": (1e7,)}, "learning rate 10000000.0 in lrs"),
    ({"weight_decay": -0.1}, "weight_decay"), ({"momentum": 1.0}, "momentum"), ({"optimizer": "sgd"}, "Unknown"),
    ({"min_steps": -3}, "min_steps"),
])
def test_a_recipe_that_cannot_train_a_probe_is_refused_when_built(fields, words):
    with pytest.raises(SelaggError, match=words.replace("(", r"\(").replace(")", r"\)")):
        ProbeRecipe(**fields)


def test_a_recipe_keeps_its_learning_rates_as_a_tuple():
    assert ProbeRecipe(lrs=[0.1, 1]).lrs == (0.1, 1)


@pytest.mark.parametrize("seeds, words", [((), "non-empty"), ((0, -1), "seed=-1"), ((0.5,), "seed=0.5")])
def test_bad_seeds_are_refused(seeds, words):
    with pytest.raises(SelaggError, match=words):
        train_probes("cls", toy(32, 0), toy(16, 1), recipe=ProbeRecipe(**QUICK), seeds=seeds)


def test_splits_too_small_or_of_another_backbone_are_refused():
    recipe = ProbeRecipe(**QUICK)
    with pytest.raises(SelaggError, match="train split holds 1 image"):
        train_probe("cls", toy(1, 0), toy(16, 1), recipe=recipe)
    with pytest.raises(SelaggError, match="val split holds 0 image"):
        train_probe("cls", toy(32, 0), toy(16, 1).subset(torch.tensor([], dtype=torch.long)), recipe=recipe)
    wide = TokenSet(torch.zeros(8, 5, 16).half(), torch.arange(8) % 3, TokenLayout(True, 0, (2, 2)))
    with pytest.raises(SelaggError, match="test split's tokens"):
        train_probe("cls", toy(32, 0), toy(16, 1), wide, recipe=recipe)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_a_nan_token_is_named_instead_of_a_chance_level_result(split):
    sets = {"train": toy(32, 0), "val": toy(16, 1), "test": toy(16, 2)}
    sets[split].tokens[5, 3, 2] = float("nan")
    with pytest.raises(SelaggError, match=f"The {split} tokens of image 5 contain NaN"):
        train_probe("mean", sets["train"], sets["val"], sets["test"], recipe=ProbeRecipe(**QUICK))


def test_a_nan_feature_row_is_named_by_knn():
    x = torch.randn(10, 4)
    x[6, 1] = float("inf")
    with pytest.raises(SelaggError, match="train features of image 6"):
        knn_accuracy(x, torch.arange(10) % 2, torch.randn(4, 4), torch.arange(4) % 2)


def test_a_diverged_learning_rate_is_named_and_never_chosen(capsys):
    recipe = ProbeRecipe(epochs=8, warmup_epochs=0, batch_size=16, lrs=(0.1, 9e5))  # LARS: x60 per step at 9e5
    result = train_probe("abmilp", toy(64, 0), toy(32, 1), toy(32, 2), recipe=recipe)
    assert result.best_lr == 0.1 and result.val > 0.5 and result.val_by_lr[1] != result.val_by_lr[1]  # NaN
    assert "learning rate(s) 900000 diverged" in capsys.readouterr().err
    with pytest.raises(SelaggError, match="Every learning rate"):
        train_probe("abmilp", toy(64, 0), toy(32, 1), recipe=ProbeRecipe(**{**recipe.__dict__, "lrs": (9e5,)}))


# ----------------------------------------------------------------------------- attention
@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny-random")


def test_a_nan_image_in_a_later_batch_is_named(tiny):
    images = torch.rand(10, 1, 32, 32)
    images[7, 0, 5, 5] = float("nan")
    with pytest.raises(SelaggError, match="Image 7 contains NaN"):
        attention_statistics(tiny, DataLoader(TensorDataset(images), batch_size=4), progress=False)


def test_empty_batches_add_nothing(tiny):
    images = torch.rand(6, 1, 32, 32)
    plain = attention_statistics(tiny, [images[:3], images[3:]], progress=False)
    with_empty = attention_statistics(tiny, [images[:0], images[:3], images[:0], images[3:]], progress=False)
    assert with_empty.n_images == 6
    assert all((plain[k] == with_empty[k]).all() for k in plain.per_block)
    with pytest.raises(SelaggError, match="no images"):
        attention_statistics(tiny, [images[:0]], progress=False)


def test_non_finite_weights_are_not_blamed_on_the_attention_module(tiny):
    broken = load_backbone("tiny-random")
    with torch.no_grad():
        broken.blocks[2].attn.qkv.weight[0, 0] = float("inf")
    with pytest.raises(SelaggError, match="Block 2 produced NaN or infinite attention from finite images"):
        attention_statistics(broken, [torch.rand(2, 1, 32, 32)], progress=False)


# ----------------------------------------------------------------------------- heads
def test_heads_refuse_options_they_would_drop_or_fail_on():
    with pytest.raises(SelaggError, match="'cls' head takes no option 'num_heads'"):
        make_head("cls", 8, num_heads=2)
    with pytest.raises(SelaggError, match="'abmilp' head takes no option 'heads'"):
        make_head("abmilp", 8, heads=2)
    assert make_head("attentive", 8, num_heads=2).attn.num_heads == 2


def test_a_negative_prefix_count_or_a_loose_layout_is_refused():
    with pytest.raises(SelaggError, match="layout is a models.TokenLayout, got a tuple"):
        MeanPool(8, (-1, False, (2, 2)))
    with pytest.raises(SelaggError, match="num_registers=-1"):
        make_head("mean", 8, TokenLayout(False, -1, (2, 2)))
    with pytest.raises(SelaggError, match="takes no option 'num_prefix_tokens'"):
        make_head("mean", 8, num_prefix_tokens=2)


def test_position_codes_of_another_grid_are_refused():
    head = make_head("abmilp-pos", 8, TokenLayout(True, 0, (3, 3)))
    with pytest.raises(SelaggError, match="Got 4 patch tokens but the head's position codes cover a grid of 9"):
        head(torch.randn(2, 5, 8))
    with pytest.raises(SelaggError, match="needs the patch grid, but the head was built without a layout"):
        make_head("abmilp-pos", 8)


def test_a_scorer_that_cannot_be_built_is_refused_before_any_weight():
    for bad, words in [(dict(act="gelu"), "activation 'gelu'"), (dict(pos_embed="learned"), "pos_embed 'learned'"),
                       (dict(depth=-1), "depth=-1"), (dict(hidden=0), "hidden=0")]:
        with pytest.raises(SelaggError, match=words):
            ScorerOptions(**bad)
    with pytest.raises(SelaggError, match="scorer must be an instance of heads.ScorerOptions, not dict"):
        make_head("abmilp", 8, scorer=dict(depth=1))


# ----------------------------------------------------------------------------- checkpoint manifests
@pytest.fixture
def checkpoint(tmp_path):
    model = tiny_vit()
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {f"backbone.{k}": v for k, v in model.state_dict().items()},
                    {"model_config": {k: v for k, v in TINY_CONFIG.items()}})
    return path


@pytest.mark.parametrize("text, words", [
    ("{not json", "not valid JSON"), (b"\xff\xfe\x00", "not valid JSON"), ("[1, 2]", "no JSON object"),
    ('{"sha256": 5}', "no 64-digit hex sha256"), ('"just a string"', "no JSON object"), ("", "not valid JSON"),
])
def test_malformed_manifests_are_refused_in_one_sentence(checkpoint, text, words):
    manifest = checkpoint.with_suffix(".json")
    manifest.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SelaggError, match=words):
        load_checkpoint(checkpoint)


@pytest.mark.parametrize("config", [{"depth": "six"}, {"no_such_option": 1}, {"embed_dim": -4}])
def test_a_manifest_whose_model_config_is_wrong_is_refused(checkpoint, config):
    manifest = checkpoint.with_suffix(".json")
    data = json.loads(manifest.read_text())
    data["model_config"] = {**data["model_config"], **config}
    manifest.write_text(json.dumps(data))
    with pytest.raises(SelaggError):
        model_from_checkpoint(checkpoint)


@pytest.mark.parametrize("registers, grid, words", [(-1, (2, 2), "num_registers=-1"),
                                                    (0, (2, 0), "positive whole numbers"),
                                                    (0, (3, 3), "does not hold the 4 patch tokens")])
def test_a_token_set_whose_layout_disagrees_with_its_tokens_is_refused(registers, grid, words):
    with pytest.raises(SelaggError, match=words):
        TokenSet(torch.zeros(4, 5, 8), torch.zeros(4, dtype=torch.long), TokenLayout(True, registers, grid))
    with pytest.raises(SelaggError, match="layout is a models.TokenLayout"):
        TokenSet(torch.zeros(4, 5, 8), torch.zeros(4, dtype=torch.long), 1)


def test_a_nan_image_is_named_by_attention_maps(tiny):
    from selagg_utils.attention import attention_maps

    images = torch.rand(3, 1, 32, 32)
    images[2, 0, 0, 0] = float("inf")
    with pytest.raises(SelaggError, match="Image 2 contains NaN or infinite"):
        attention_maps(tiny, images)


@pytest.mark.parametrize("call, words", [
    (lambda x, y: knn_accuracy(x, y, x, y, k=0), "k=0"),
    (lambda x, y: knn_accuracy(x, y, x, y, temperature=0.0), "temperature=0.0"),
    (lambda x, y: logistic_probe_accuracy(x, y, x, y, C=0.0), "C=0.0"),
    (lambda x, y: ridge_accuracy(x, y, x, y, alpha=-1.0), "alpha=-1.0"),
    (lambda x, y: low_shot_indices(y, 1, draws=0), "draws=0"),
])
def test_evaluation_settings_that_would_give_a_meaningless_number_are_refused(call, words):
    with pytest.raises(SelaggError, match=words):
        call(torch.randn(12, 4), torch.arange(12) % 3)


# ----------------------------------------------------------------------------- options of the wrong type
def test_an_options_argument_of_another_type_names_the_class_to_build(tmp_path):
    from selagg_utils import features, probing
    from selagg_utils.scaleout import ddp_probing, shards
    from selagg_utils.weights import training

    calls = [
        ("extraction.ExtractOptions", lambda: features.cached_tokens("tiny-random", None, options={"batch_size": 8})),
        ("shard_files.StoreOptions", lambda: shards.extract_to_store("tiny-random", None, tmp_path, store={})),
        ("heads.ScorerOptions", lambda: make_head("abmilp", 8, scorer={"depth": 1})),
        ("probing.ProbeRecipe", lambda: train_probe("cls", toy(32, 0), toy(16, 1), recipe={"epochs": 1})),
        ("probing.ProbeRecipe", lambda: ddp_probing.train_probes_distributed("cls", toy(32, 0), toy(16, 1),
                                                                             recipe={"epochs": 1})),
        ("probing.LowShot", lambda: probing.low_shot_accuracy("cls", toy(32, 0), toy(16, 1), toy(16, 2), 5)),
        ("ddp_probing.ProbeProblem", lambda: ddp_probing.bench_probe_epoch("mean", (32, 17, 8))),
        ("pretrain.TrainOptions", lambda: training.pretrain_tiny("random", 0, 8, {"lr": 1e-3}, out_dir=tmp_path)),
    ]
    for where, call in calls:
        with pytest.raises(SelaggError, match=rf"must be an instance of {where}, not (dict|int|tuple); build one"):
            call()
    assert not any(tmp_path.iterdir()), "a refused call left files behind"
