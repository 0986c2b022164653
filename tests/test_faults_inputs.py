"""Faults of what a reader hands in: weights files, transforms, splits, settings, folders and kinds of input.

Each ends in the correct result or in the package's one sentence, never in a number computed from the wrong thing.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from selagg_utils import SelaggError
from selagg_utils.cache.keys import cache_key, dataset_identity, entry_path
from selagg_utils.data import cluttered_digits
from selagg_utils.extraction import EXTRACTION_VERSION, ExtractOptions
from selagg_utils.features import TokenSet, cached_tokens
from selagg_utils.models import TokenLayout, load_backbone, tiny_checkpoint_path
from selagg_utils.probing import ProbeRecipe, train_probe, train_probes

ARCH = "vit_tiny_patch16_224"
QUICK = dict(epochs=2, warmup_epochs=0, batch_size=8)


@pytest.fixture(scope="module")
def donor():
    """A timm ViT with seeded random weights, and its state."""
    model = load_backbone(f"random:{ARCH}:5")
    return model, {k: v.contiguous() for k, v in model.state_dict().items()}


def toy(n: int, seed: int, key: dict | None = None) -> TokenSet:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    x = torch.randn(n, 5, 8, generator=g)
    x[:, :, :3] += 4 * torch.nn.functional.one_hot(labels, 3)[:, None]
    return TokenSet(x.half(), labels, TokenLayout(True, 0, (2, 2)), key or {})


# ----------------------------------------------------------------------------- weights files
@pytest.mark.parametrize("wrap, words", [
    (lambda sd: {f"module.{k}": v for k, v in sd.items()}, "prefix 'module.'"),
    (lambda sd: {"model": sd, "epoch": 3}, "under 'model'"),
    (lambda sd: {"teacher": {**{f"module.backbone.{k}": v for k, v in sd.items()}, "module.head.w": torch.ones(2)}},
     "under 'teacher'"),
    (lambda sd: {**{f"backbone.{k}": v for k, v in sd.items()}, "decoder.w": torch.ones(2)}, "prefix 'backbone.'"),
])
def test_weights_under_a_wrapper_load_in_full_and_say_so(tmp_path, donor, capsys, wrap, words):
    model, state = donor
    path = tmp_path / "w.pth"
    torch.save(wrap(state), path)
    got = load_backbone(f"{ARCH}@{path}")
    assert all(torch.equal(got.state_dict()[k], v) for k, v in state.items())
    assert words in capsys.readouterr().err


def test_weights_that_do_not_fill_the_architecture_are_refused(tmp_path, donor):
    _, state = donor
    with pytest.raises(SelaggError, match="do not fit the architecture 'vit_tiny_patch16_224'"):
        load_backbone(f"{ARCH}@{tiny_checkpoint_path('tiny-mae')}")  # the book's own file: other shapes
    path = tmp_path / "w.safetensors"
    save_file({k: v for k, v in state.items() if k != "norm.weight"}, str(path))
    with pytest.raises(SelaggError, match=r"missing: norm.weight; 1 missing, 0 unexpected"):
        load_backbone(f"{ARCH}@{path}")
    save_file({**state, "extra.weight": torch.ones(3)}, str(path))
    with pytest.raises(SelaggError, match=r"unexpected: extra.weight"):
        load_backbone(f"{ARCH}@{path}")


@pytest.mark.parametrize("name, content", [("empty.safetensors", b""), ("junk.safetensors", b"not weights" * 9),
                                           ("junk.pth", b"not a pickle"), ("empty.bin", b"")])
def test_malformed_weights_files_are_a_sentence(tmp_path, donor, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SelaggError, match=f"Could not read {name}"):
        load_backbone(f"{ARCH}@{path}")


def test_a_half_written_weights_file_is_a_sentence(tmp_path, donor):
    path = tmp_path / "half.safetensors"
    save_file(donor[1], str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SelaggError, match="Could not read half.safetensors"):
        load_backbone(f"{ARCH}@{path}")


# ----------------------------------------------------------------------------- what the cache key holds
class Images(torch.utils.data.Dataset):
    def __init__(self, transform):
        self.transform = transform

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return self.transform(torch.full((1, 32, 32), float(i))), i


def test_the_key_holds_code_and_library_versions_and_the_manifests_model(tmp_path):
    data = cluttered_digits("val", n_images=4)
    for ext in (".safetensors", ".json"):
        shutil.copy(tiny_checkpoint_path("tiny-mae").with_suffix(ext), tmp_path / f"mine{ext}")
    mine = str(tmp_path / "mine.safetensors")
    before = cache_key(mine, data, "last", True)
    assert before["code"] == EXTRACTION_VERSION and before["timm"] and before["torch"]
    assert cache_key("tiny-mae", data, "last", True)["model_config"]["num_heads"] == 4
    manifest = json.loads((tmp_path / "mine.json").read_text())
    manifest["model_config"]["num_heads"] = 8
    (tmp_path / "mine.json").write_text(json.dumps(manifest))
    assert cache_key(mine, data, "last", True) != before


def test_an_entry_of_another_code_version_is_never_read(cache, monkeypatch):
    from selagg_utils.cache import keys as cache_keys

    data = cluttered_digits("val", n_images=4)
    old = cached_tokens("tiny-mae", data, options=ExtractOptions(batch_size=4, progress=False))
    monkeypatch.setattr(cache_keys, "EXTRACTION_VERSION", EXTRACTION_VERSION + 1)
    new_key = cache_key("tiny-mae", data, "last", True)
    assert entry_path(new_key) != entry_path(old.key) and not entry_path(new_key).exists()


def test_a_transform_is_described_in_full_and_a_function_refused(tmp_path):
    from torchvision import transforms as T

    a, b = (dataset_identity(Images(T.Normalize([m], [1.0]))) for m in (0.0, 0.5))
    assert a != b and "Normalize" in json.dumps(a)
    for step in (T.Lambda(lambda t: t), T.Compose([T.Normalize([0.0], [1.0]), lambda t: t * 2])):
        with pytest.raises(SelaggError, match="cannot describe.*data_key"):
            dataset_identity(Images(step))
    assert dataset_identity(Images(T.Lambda(lambda t: t)), data_key="mine-v1")["data"]["caller_key"] == "mine-v1"


# ----------------------------------------------------------------------------- splits of one backbone
@pytest.fixture(scope="module")
def two_backbones(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    options = ExtractOptions(batch_size=12, progress=False)
    return {name: {split: cached_tokens(name, cluttered_digits(split, n_images=12), options=options, directory=folder)
                   for split in ("train", "val")} for name in ("tiny-mae", "tiny-jea")}


def test_splits_of_two_backbones_are_refused(two_backbones):
    from selagg_utils.linear_eval import knn_accuracy, logistic_probe_accuracy, position_accuracy, ridge_accuracy
    from selagg_utils.scaleout.ddp_probing import train_probes_distributed

    mae, jea = two_backbones["tiny-mae"], two_backbones["tiny-jea"]
    recipe = ProbeRecipe(**QUICK)
    with pytest.raises(SelaggError, match="val split's tokens come from 'tiny-jea'.*train split's from 'tiny-mae'"):
        train_probe("cls", mae["train"], jea["val"], recipe=recipe)
    with pytest.raises(SelaggError, match="test split's tokens come from 'tiny-mae'"):
        train_probe("cls", jea["train"], jea["val"], mae["val"], recipe=recipe)
    with pytest.raises(SelaggError, match="come from 'tiny-jea'"):
        train_probes_distributed("cls", mae["train"], jea["val"], recipe=recipe)
    with pytest.raises(SelaggError, match="come from 'tiny-jea'"):
        position_accuracy(mae["train"], jea["val"])
    for evaluate in (knn_accuracy, logistic_probe_accuracy, ridge_accuracy):
        with pytest.raises(SelaggError, match="test split's features come from 'tiny-jea'"):
            evaluate(mae["train"].cls, mae["train"].labels, jea["val"].mean_patches, jea["val"].labels)
    assert knn_accuracy(mae["train"].cls, mae["train"].labels, mae["val"].cls, mae["val"].labels) >= 0
    assert train_probe("cls", mae["train"], mae["train"].subset(torch.arange(6)), recipe=recipe).val >= 0


def test_a_val_or_test_split_with_classes_train_lacks_is_refused():
    train, val = toy(12, 0), toy(6, 1)
    train = TokenSet(train.tokens, train.labels.clamp(max=1), train.layout)  # classes 0 and 1 only
    with pytest.raises(SelaggError, match=r"val split holds class\(es\) \[2\] that the train split lacks"):
        train_probe("cls", train, val, recipe=ProbeRecipe(**QUICK))
    from selagg_utils.scaleout.ddp_probing import train_probes_distributed

    with pytest.raises(SelaggError, match=r"class\(es\) \[2\] that the train parts lack"):
        train_probes_distributed("cls", train, val, recipe=ProbeRecipe(**QUICK))


def test_splits_of_two_blocks_or_weights_are_refused():
    weights = {"backbone": "tiny-mae", "sha256": "a" * 64}
    train = toy(12, 0, {**weights, "block": 6, "data": "x"})
    with pytest.raises(SelaggError, match=r"'tiny-mae' \(block 3\)"):
        train_probe("cls", train, toy(6, 1, {**weights, "block": 3, "data": "y"}), recipe=ProbeRecipe(**QUICK))
    with pytest.raises(SelaggError, match="other weights of 'tiny-mae'"):
        train_probe("cls", train, toy(6, 1, {**weights, "sha256": "b" * 64, "block": 6}), recipe=ProbeRecipe(**QUICK))


# ----------------------------------------------------------------------------- kinds of input
def test_generators_for_seeds_or_learning_rates_are_refused():
    with pytest.raises(SelaggError, match="seeds=<generator.*list or tuple"):
        train_probes("cls", toy(12, 0), toy(6, 1), recipe=ProbeRecipe(**QUICK), seeds=(s for s in (0, 1)))
    with pytest.raises(SelaggError, match="lrs=<generator.*list or tuple"):
        ProbeRecipe(lrs=(lr for lr in (0.1, 1.0)))
    assert ProbeRecipe(lrs=[0.1, 1.0]).lrs == (0.1, 1.0)
    assert len(train_probes("cls", toy(12, 0), toy(6, 1), recipe=ProbeRecipe(**QUICK), seeds=range(2))) == 2


def test_float_labels_in_a_token_set_are_refused():
    t = toy(4, 0)
    with pytest.raises(SelaggError, match="integer dtype, got torch.float32"):
        TokenSet(t.tokens, t.labels.float(), t.layout)


def test_a_device_this_machine_lacks_is_a_sentence_at_the_entry_point():
    missing = "cuda:7" if torch.cuda.device_count() < 8 else "mps"
    with pytest.raises(SelaggError, match="cuda:7|mps"):
        ExtractOptions(device=missing)
    with pytest.raises(SelaggError, match="cuda:7|mps"):
        train_probe("cls", toy(12, 0), toy(6, 1), recipe=ProbeRecipe(**QUICK), device=missing)


def test_a_tiny_backbone_given_colour_images_of_224_pixels_is_a_sentence(tmp_path):
    images = torch.utils.data.TensorDataset(torch.rand(2, 3, 224, 224), torch.tensor([0, 1]))
    with pytest.raises(SelaggError, match="reads images of 1 x 32 x 32.*gives 3 x 224 x 224"):
        cached_tokens("tiny-mae", images, options=ExtractOptions(batch_size=2, progress=False), directory=tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))


# ----------------------------------------------------------------------------- settings, checked whole
@pytest.fixture
def full_env(monkeypatch):
    from selagg_utils import config

    for var in (config.MAX_IMAGES_VAR, config.MORE_VAR, "SELAGG_PRETRAINED"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.mark.parametrize("var, value, words", [
    ("SELAGG_MAX_IMAGES", "5", "SELAGG_MAX_IMAGES=5 is fewer images per split than imagenette's 10 classes"),
    ("SELAGG_MORE_BACKBONES", "vit_small_patch16_224.dino,vit_smal_patch16_224", "not a backbone.*did you mean"),
    ("SELAGG_MORE_BACKBONES", "tiny-mae", "'tiny-mae' in SELAGG_MORE_BACKBONES reads the tiny scale's"),
    ("SELAGG_MORE_BACKBONES", "vit_small_patch16_224@/no/such/file.pth", "no weights file at /no/such/file.pth"),
    ("SELAGG_PRETRAINED", "nein", "SELAGG_PRETRAINED='nein' is not accepted"),
])
def test_settings_that_cannot_work_are_refused_when_built(full_env, var, value, words):
    from selagg_utils import config

    full_env.setenv(var, value)
    with pytest.raises(SelaggError, match=words):
        config.settings("full")


@pytest.mark.parametrize("value, pretrained", [("false", False), ("No", False), ("off", False), ("0", False),
                                               ("TRUE", True), ("yes", True), ("", True)])
def test_the_pretrained_flag_accepts_the_usual_spellings(full_env, value, pretrained):
    from selagg_utils.models import resolve_backbone

    full_env.setenv("SELAGG_PRETRAINED", value)
    assert resolve_backbone(ARCH, scale="full").pretrained is pretrained


def test_an_image_cap_at_the_tiny_scale_is_said(full_env, capsys):
    from selagg_utils import config

    full_env.setenv("SELAGG_MAX_IMAGES", "40")
    assert config.settings("tiny").n_train == 5000
    assert "applies to the full scale only" in capsys.readouterr().err


def test_a_cap_below_the_number_of_classes_is_refused_by_the_data():
    from selagg_utils.imagenette.folders import stratified_subset

    data = torch.utils.data.TensorDataset(torch.zeros(30, 1), torch.arange(30) % 10)
    with pytest.raises(SelaggError, match="max_images=5 is fewer than the 10 classes"):
        stratified_subset(data, 5)
    assert len(stratified_subset(data, 10)) == 10


# ----------------------------------------------------------------------------- the scripts
def load_train_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_probes.py"
    spec = importlib.util.spec_from_file_location("train_probes_script_faults", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("extra, words", [([], "holds no readable index.json"),
                                          (["--seeds", "-1"], "seed=-1"), (["--epochs", "0"], "epochs=0")])
def test_the_probe_script_prints_the_sentence_and_exits_with_2(tmp_path, capsys, extra, words):
    script = load_train_script()
    code = script.main(["--train", str(tmp_path / "none"), "--val", str(tmp_path / "none"), "--head", "cls", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("SelaggError: ") and words in err and "Traceback" not in err


def test_the_probe_script_refuses_stores_of_two_backbones(tmp_path, capsys):
    from selagg_utils.scaleout.shard_files import StoreOptions
    from selagg_utils.scaleout.shards import extract_to_store

    quiet = ExtractOptions(batch_size=8, progress=False)
    for name, split in (("tiny-mae", "train"), ("tiny-jea", "val")):
        extract_to_store(name, cluttered_digits(split, n_images=8), tmp_path / split, store=StoreOptions(8),
                         options=quiet)
    code = load_train_script().main(["--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"), "--head",
                                     "cls", "--epochs", "1", "--batch-size", "4"])
    assert code == 2 and "val split's tokens come from 'tiny-jea'" in capsys.readouterr().err


def test_the_extraction_script_checks_its_report_path_before_the_work(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "extract_tokens.py"
    spec = importlib.util.spec_from_file_location("extract_tokens_script_faults", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    code = script.main(["--backbone", "tiny-mae", "--dataset", "cluttered-digits", "--split", "val", "--max-images",
                        "4", "--out", str(tmp_path / "store"), "--report", str(tmp_path)])
    assert code == 2 and "is a folder" in capsys.readouterr().err and not (tmp_path / "store").exists()


@pytest.mark.parametrize("out", ["folder", "/proc/selagg-results/r.json"])
def test_the_probe_script_checks_its_output_before_training(tmp_path, monkeypatch, capsys, out):
    script = load_train_script()
    monkeypatch.setattr(script, "load_part", lambda path, info: pytest.fail("trained before checking --out"))
    target = tmp_path if out == "folder" else out
    assert script.main(["--train", "a", "--val", "b", "--head", "cls", "--out", str(target)]) == 2
    assert "SelaggError: " in capsys.readouterr().err


def test_a_full_disk_while_writing_a_store_is_a_sentence_and_a_rerun_finishes(tmp_path, file_size_limit):
    from selagg_utils.scaleout.shard_files import StoreOptions
    from selagg_utils.scaleout.shards import extract_to_store

    data = cluttered_digits("val", n_images=6)
    quiet = ExtractOptions(batch_size=6, progress=False)
    file_size_limit(20_000)  # a shard of 4 images needs about 67 kB
    try:
        with pytest.raises(SelaggError, match="Could not write shard-00000.safetensors.*0 complete shard"):
            extract_to_store("tiny-random", data, tmp_path / "s", store=StoreOptions(4), options=quiet)
    finally:
        file_size_limit(None)
    assert not list((tmp_path / "s").glob("*.tmp")) and not list((tmp_path / "s").glob("shard-*"))
    store = extract_to_store("tiny-random", data, tmp_path / "s", store=StoreOptions(4), options=quiet)
    assert len(store) == 6


# ----------------------------------------------------------------------------- image folders that lie
def image_tree(root, per_class: int = 5):
    from PIL import Image

    for part in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            (root / part / cls).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (16, 16), (60 * c, 10 * i, 200)).save(root / part / cls / f"{i}.png")
    return root


def test_hidden_folders_are_never_classes_or_images(tmp_path, capsys):
    from PIL import Image

    from selagg_utils.imagenette.folders import image_folder

    root = image_tree(tmp_path)
    for where in ("train/.ipynb_checkpoints", "val/.ipynb_checkpoints", "train/a/.ipynb_checkpoints"):
        (root / where).mkdir()
        Image.new("RGB", (16, 16)).save(root / where / "0-checkpoint.png")
    test = image_folder(root, "test", image_size=16)
    assert test.classes == ["a", "b"] and len(test) == 10
    assert len(image_folder(root, "train", image_size=16).dataset) == 10
    assert capsys.readouterr().err.count(".ipynb_checkpoints") == 3  # said once per folder that holds one


@pytest.mark.parametrize("link, words", [("val/b/x.png -> train/a/0.png", "are one file"),
                                         ("train/b/x.png -> train/a/0.png", "are one file"),
                                         ("train/a/loop -> train/a", "link back to a folder already read"),
                                         ("val/a/x.png -> nowhere.png", "is a link to nothing")])
def test_links_that_would_duplicate_an_image_or_never_end_are_refused(tmp_path, link, words):
    import os

    from selagg_utils.imagenette.folders import image_folder

    root = image_tree(tmp_path)
    name, target = link.split(" -> ")
    os.symlink(root / target, root / name)
    with pytest.raises(SelaggError, match=words):
        image_folder(root, "test", image_size=16)


def test_a_link_to_an_image_elsewhere_is_followed(tmp_path):
    import os

    from selagg_utils.imagenette.folders import image_folder

    root = image_tree(tmp_path / "data")
    (root / "val" / "a" / "0.png").rename(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", root / "val" / "a" / "0.png")
    assert len(image_folder(root, "test", image_size=16)) == 10


def test_images_of_16_bits_are_decoded_at_their_depth_and_32_bit_ones_refused(tmp_path):
    import numpy as np
    from PIL import Image

    from selagg_utils.imagenette.folders import rgb_image

    grey = (np.arange(256).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535
    Image.fromarray(grey).save(tmp_path / "deep.png")
    assert np.array_equal(np.asarray(rgb_image(str(tmp_path / "deep.png")))[..., 0], np.arange(256).reshape(16, 16))
    Image.fromarray(grey.astype(np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(SelaggError, match="float.tif.*range cannot be told"):
        rgb_image(str(tmp_path / "float.tif"))


def test_a_class_too_small_to_be_in_both_carved_splits_is_refused(tmp_path):
    from selagg_utils.imagenette.folders import image_folder

    root = image_tree(tmp_path)
    for i in range(1, 5):
        (root / "train" / "b" / f"{i}.png").unlink()
    with pytest.raises(SelaggError, match="class 'b'.*too few images to be in both"):
        image_folder(root, "train", image_size=16, val_fraction=0.5)


# ----------------------------------------------------------------------------- a cache shared by a group
@pytest.mark.parametrize("folder_mode, group_reads", [(0o2775, True), (0o755, False)])
def test_entries_in_a_group_writable_cache_are_readable_by_the_group(tmp_path, folder_mode, group_reads):
    import os

    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, folder_mode)
    cached_tokens("tiny-mae", cluttered_digits("val", n_images=4), options=ExtractOptions(batch_size=4, progress=False),
                  directory=folder)
    (entry,) = folder.glob("*.safetensors")
    assert bool(entry.stat().st_mode & 0o040) is group_reads and entry.stat().st_mode & 0o600 == 0o600


def test_a_book_checkpoint_whose_file_is_garbage_under_a_matching_manifest_is_a_sentence(tmp_path):
    from selagg_utils.checks import sha256_of

    path = tmp_path / "mine.safetensors"
    path.write_bytes(b"\x08" + b"\x00" * 7 + b"{broken")
    (tmp_path / "mine.json").write_text(json.dumps({"sha256": sha256_of(path), "model_config": {}}))
    with pytest.raises(SelaggError, match="Could not read mine.safetensors"):
        load_backbone(str(path))


def test_attention_statistics_of_images_the_backbone_cannot_read_are_a_sentence():
    from selagg_utils.attention import attention_statistics

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(2, 3, 64, 64)), batch_size=2)
    with pytest.raises(SelaggError, match="reads images of 1 x 32 x 32.*gives 3 x 64 x 64"):
        attention_statistics(load_backbone("tiny-mae"), loader, progress=False)


def test_a_training_checkpoint_with_python_objects_is_a_sentence_not_unpickled(tmp_path, donor):
    import argparse

    path = tmp_path / "train.pth"
    torch.save({"model": donor[1], "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(SelaggError, match="holds Python objects besides tensors"):
        load_backbone(f"{ARCH}@{path}")


def test_a_model_passed_in_is_keyed_by_its_architecture_too():
    from selagg_utils.models import tiny_vit

    data = cluttered_digits("val", n_images=2)
    four, eight = tiny_vit(depth=1, num_heads=4), tiny_vit(depth=1, num_heads=8)
    eight.load_state_dict(four.state_dict())  # the same weights, read by other heads
    assert cache_key("mine", data, "last", True, model=four) != cache_key("mine", data, "last", True, model=eight)
