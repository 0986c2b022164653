"""The full-scale data path, offline: transforms per checkpoint, display, stratified subsets, Imagenette's
download and unpacking, bad folders and the registry. Every folder is generated in tmp_path."""
import hashlib
import io
import pickle
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from selagg_utils import SelaggError, data
from selagg_utils.data import (
    DATASETS,
    REGISTRY,
    available_datasets,
    cluttered_digits,
    load_dataset,
)
from selagg_utils.imagenette import folders as imagenette_files
from selagg_utils.imagenette import transforms as folder_transforms
from selagg_utils.imagenette.folders import (
    image_folder,
    imagenette,
    stratified_subset,
)
from selagg_utils.imagenette.transforms import model_data_config
from selagg_utils.scaleout.rehearsal import fake_imagenette
from selagg_utils.subsets import (
    class_quotas,
    example_indices,
    labels_of,
    stratified_positions,
)
from selagg_utils.transforms import displayable, normalization
from selagg_utils.weights import network


def make_folder(root, parts: dict, size=(40, 30)):
    """root/<part>/<class>/<i>.png with a solid colour per class and image; returns root."""
    for part, classes in parts.items():
        for c, (cls, n) in enumerate(classes.items()):
            (root / part / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", size, (30 + 50 * c, 10 + 7 * i, 200)).save(root / part / cls / f"{i}.png")
    return root


@pytest.fixture
def folder(tmp_path):
    """Imbalanced classes: train a:12 b:6 c:2, val a:10 b:5 c:5."""
    return make_folder(tmp_path, {"train": {"a": 12, "b": 6, "c": 2}, "val": {"a": 10, "b": 5, "c": 5}})


# ----------------------------------------------------------------------------- transforms per checkpoint
@pytest.mark.parametrize("size", [32, 224])
def test_the_default_transform_is_unchanged(folder, size):
    """The feature cache keys on the transform's repr: without a config it must stay what it was."""
    from timm.data import create_transform

    before = repr(create_transform(size, is_training=False, crop_pct=1.0 if size < 224 else 0.875))
    assert repr(image_folder(folder, "test", image_size=size).transform) == before


def test_a_checkpoints_data_config_builds_its_transform(folder):
    config = {"input_size": (3, 48, 48), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5),
              "std": (0.25, 0.25, 0.25), "crop_pct": 0.9, "crop_mode": "center"}
    test = load_dataset(f"imagefolder:{folder}", "test", data_config=config)
    text = repr(test.transform)
    assert "bicubic" in text and "size=53" in text and "(48, 48)" in text  # int(48 / 0.9) = 53, then crop
    assert test[0][0].shape == (3, 48, 48)
    assert normalization(test) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    train = load_dataset(f"imagefolder:{folder}", "train", data_config=config, image_size=32)
    assert train[0][0].shape == (3, 32, 32) and normalization(train) == normalization(test)
    assert repr(train.dataset.transform) != repr(image_folder(folder, "train", image_size=32).dataset.transform)


def test_a_model_built_at_another_size_gets_its_own_input_size():
    """DINOv2's checkpoint says 518 px; a model built at 56 px must get 56 px images."""
    import timm
    from timm.data import resolve_model_data_config

    model = timm.create_model("vit_small_patch14_reg4_dinov2.lvd142m", pretrained=False, img_size=56)
    assert resolve_model_data_config(model)["input_size"] == (3, 518, 518)
    config = model_data_config(model)
    assert config["input_size"] == (3, 56, 56) and config["interpolation"] == "bicubic"
    assert folder_transforms.eval_transform(config)(Image.new("RGB", (80, 60))).shape == (3, 56, 56)


@pytest.mark.parametrize("config, words", [
    ({"input_size": (3, 32, 32)}, "lacks interpolation, mean, std, crop_pct"),
    ({**folder_transforms.default_data_config(32), "hflip": 0.5}, "unknown keys hflip"),
    ({**folder_transforms.default_data_config(32), "input_size": 32}, "channels, height, width"),
    ((3, 32, 32), "must be a dict"),
])
def test_a_bad_data_config_is_refused(folder, config, words):
    with pytest.raises(SelaggError, match=words):
        image_folder(folder, "test", data_config=config)


# ----------------------------------------------------------------------------- display
def test_displayed_images_have_their_stored_colours_back(folder):
    """A solid image normalised and de-normalised shows its own colour, channels below the mean included."""
    train = image_folder(folder, "train", image_size=32)  # a Subset: statistics read through it
    index = 0
    path, _ = train.dataset.samples[train.indices[index]]
    expected = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)[0, 0] / 255
    batch = torch.stack([train[index][0], train[index][0]])
    assert (batch < 0).any()  # clamping before de-normalising would turn these to 0
    shown = displayable(batch, train)
    assert shown.shape == (2, 3, 32, 32) and shown.dtype == torch.float32
    assert np.abs(shown.permute(0, 2, 3, 1).numpy() - expected).max() < 1.5 / 255
    assert shown.min() >= 0 and shown.max() <= 1


def test_the_tiny_dataset_is_shown_as_stored():
    ds = cluttered_digits("val", n_images=8)
    assert normalization(ds) is None and normalization(torch.utils.data.Subset(ds, [1, 2])) is None
    shown = displayable(ds.images[:4], ds)
    assert shown.shape == (4, 1, 32, 32) and torch.equal(shown, ds.images[:4].clamp(0, 1))


def test_display_refuses_what_it_cannot_undo(folder):
    test = image_folder(folder, "test", image_size=16)
    x = torch.stack([test[0][0], test[1][0]])
    with pytest.raises(SelaggError, match=r"\(B, C, H, W\)"):
        displayable(x[0], test)
    nan = x.clone()
    nan[1, 0, 3, 3] = float("nan")
    with pytest.raises(SelaggError, match="Image 1"):
        displayable(nan, test)
    with pytest.raises(SelaggError, match="one per channel"):
        displayable(x, test, stats=((0.5, 0.5), (0.2, 0.2)))

    class Scale:  # a transform step the package cannot read
        def __call__(self, image):
            return image

    test.transform.transforms.append(Scale())
    with pytest.raises(SelaggError, match="Scale"):
        normalization(torch.utils.data.Subset(torch.utils.data.Subset(test, [0, 1]), [0]))
    assert displayable(x, test, stats=((0.0,), (1.0,))).max() <= 1  # the way out the message gives
    test.transform.transforms[-1] = __import__("torchvision").transforms.Lambda(lambda t: (t - 0.5) / 0.2)
    with pytest.raises(SelaggError, match="Lambda"):
        normalization(test)


# ----------------------------------------------------------------------------- subsets that see every class
def test_class_quotas_are_floor_or_ceil_of_each_share_and_see_small_classes():
    rng = np.random.default_rng(0)
    for _ in range(300):
        counts = rng.integers(1, 60, rng.integers(2, 12))
        n = int(rng.integers(1, counts.sum() + 1))
        quotas = class_quotas(counts, n, np.random.default_rng(1))
        share = n * counts / counts.sum()
        assert quotas.sum() == n
        assert np.all((quotas == np.floor(share)) | (quotas == np.ceil(share)))
        assert np.all(quotas <= counts)
        if (quotas == 0).any():  # a class left unseen: no ceiling went to a class that had one already
            assert not ((quotas > np.floor(share)) & (np.floor(share) > 0)).any()
    assert class_quotas(np.array([98, 1, 1]), 3, np.random.default_rng(0)).tolist() in ([2, 1, 0], [2, 0, 1])


def test_every_prefix_of_a_stratified_draw_is_near_stratified():
    rng = np.random.default_rng(0)
    for _ in range(50):
        labels = rng.integers(0, rng.integers(2, 8), rng.integers(20, 300))
        n = int(rng.integers(1, len(labels) + 1))
        picks = stratified_positions(labels, n, np.random.default_rng(3))
        assert len(set(picks.tolist())) == n
        chosen = labels[picks]
        classes, quotas = np.unique(chosen, return_counts=True)
        for m in range(1, n + 1):
            seen = np.array([(chosen[:m] == c).sum() for c in classes])
            assert np.abs(seen - m * quotas / n).max() <= 1.0 + 1e-9


def test_max_images_gives_a_seeded_class_stratified_subset(folder):
    full = image_folder(folder, "test", image_size=16)  # val/: a 10, b 5, c 5
    capped = load_dataset(f"imagefolder:{folder}", "test", image_size=16, max_images=8)
    assert len(capped) == 8 and capped.classes == ["a", "b", "c"]
    assert np.bincount(labels_of(capped)).tolist() == [4, 2, 2]
    assert set(labels_of(capped)[:3].tolist()) == {0, 1, 2}  # the order interleaves the classes
    assert isinstance(capped.dataset, type(full))  # one Subset over the ImageFolder, not nested
    assert [capped.dataset.targets[i] for i in capped.indices] == labels_of(capped).tolist()
    again = image_folder(folder, "test", image_size=16, max_images=8)
    other = image_folder(folder, "test", image_size=16, max_images=8, seed=1)
    assert again.indices == capped.indices and other.indices != capped.indices
    whole = image_folder(folder, "test", image_size=16, max_images=20)
    assert not isinstance(whole, torch.utils.data.Subset) and len(whole) == 20  # a cap above the size is no cap


def test_a_cap_on_a_carved_split_stays_inside_it(folder):
    train = image_folder(folder, "train", image_size=16)  # 20 images, val carves 2
    capped = image_folder(folder, "train", image_size=16, max_images=9)
    assert set(capped.indices) <= set(train.indices) and len(capped) == 9
    assert isinstance(capped.dataset, type(train.dataset))
    assert np.bincount(labels_of(capped)).tolist() in ([5, 3, 1], [6, 2, 1], [5, 2, 2])


def test_val_is_carved_from_train_by_class(tmp_path):
    root = make_folder(tmp_path, {"train": {"a": 10, "b": 10}, "val": {"a": 1, "b": 1}})
    for seed in range(5):
        train = image_folder(root, "train", image_size=16, val_fraction=0.2, seed=seed)
        val = image_folder(root, "val", image_size=16, val_fraction=0.2, seed=seed)
        assert np.bincount(labels_of(val)).tolist() == [2, 2]
        assert sorted(train.indices + val.indices) == list(range(20))


@pytest.mark.parametrize("cap", [0, -3, 2.5, True, "10"])
def test_bad_caps_are_refused(folder, cap):
    with pytest.raises(SelaggError, match="max_images"):
        image_folder(folder, "test", image_size=16, max_images=cap)


def test_cluttered_digits_refuses_max_images():
    with pytest.raises(SelaggError, match="n_images=100"):
        load_dataset("cluttered-digits", "val", max_images=100)


def test_example_indices_are_stratified_and_seeded_on_the_tiny_dataset():
    ds = cluttered_digits("val", n_images=500)
    picks = example_indices(ds, 20)
    assert len(set(picks)) == 20 and picks != list(range(20))
    counts = np.bincount(ds.labels[picks].numpy(), minlength=10)
    share = 20 * np.bincount(ds.labels.numpy(), minlength=10) / 500
    assert np.all((counts == np.floor(share)) | (counts == np.ceil(share))) and np.all(counts >= 1)
    assert example_indices(ds, 20) == picks and example_indices(ds, 20, seed=1) != picks
    assert len(set(ds.labels[example_indices(ds, 10)].tolist())) == 10


def test_example_indices_read_folder_labels_without_loading_images(folder):
    train = image_folder(folder, "train", image_size=16)

    def no_loading(path):
        raise AssertionError(f"loaded {path}")

    train.dataset.loader = no_loading
    picks = example_indices(train, 3, seed=2)
    assert sorted({int(train.dataset.targets[train.indices[p]]) for p in picks}) == [0, 1, 2]
    with pytest.raises(SelaggError, match="at most 18"):
        example_indices(train, 19)
    with pytest.raises(SelaggError, match="n=0"):
        example_indices(train, 0)


# ----------------------------------------------------------------------------- bad folders
def test_a_folder_with_one_class_is_refused(tmp_path):
    make_folder(tmp_path, {"val": {"only": 3}})
    with pytest.raises(SelaggError, match="at least two classes"):
        image_folder(tmp_path, "test")


def test_an_empty_folder_and_an_empty_class_are_refused(tmp_path):
    (tmp_path / "val").mkdir()
    with pytest.raises(SelaggError, match="holds no class folders"):
        image_folder(tmp_path, "test")
    make_folder(tmp_path, {"val": {"a": 2}})
    (tmp_path / "val" / "b").mkdir()
    (tmp_path / "val" / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(SelaggError, match="'b'.*no image files"):
        image_folder(tmp_path, "test")


def test_train_and_val_with_other_classes_are_refused(tmp_path):
    make_folder(tmp_path, {"train": {"a": 4, "b": 4, "c": 2}, "val": {"a": 2, "c": 2}})
    with pytest.raises(SelaggError, match="different class folders.*b"):
        image_folder(tmp_path, "test")


@pytest.mark.parametrize("damage", ["text", "truncated"])
def test_an_unreadable_image_names_the_file(folder, damage):
    bad = folder / "val" / "b" / "3.png"
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(buffer, "PNG")
    bad.write_bytes(b"this is not an image" if damage == "text" else buffer.getvalue()[:300])
    test = image_folder(folder, "test", image_size=16)
    position = [p for p, _ in test.samples].index(str(bad))
    with pytest.raises(SelaggError, match=r"3\.png.*remove or replace"):
        test[position]
    test[0]  # the others still load
    copy = pickle.loads(pickle.dumps(test))  # DataLoader workers started by spawn get a pickled copy
    with pytest.raises(SelaggError, match=r"3\.png"):
        copy[position]


def test_a_bad_val_fraction_is_refused(folder):
    for fraction in (0, 1, -0.1, float("nan")):
        with pytest.raises(SelaggError, match="val_fraction"):
            image_folder(folder, "train", val_fraction=fraction)


# ----------------------------------------------------------------------------- Imagenette
@pytest.fixture(scope="module")
def archive_bytes(tmp_path_factory):
    """A small imagenette2-160.tgz made from the generated stand-in (10 classes, 3 train + 1 val each)."""
    source = fake_imagenette(tmp_path_factory.mktemp("fake"), train_per_class=3, val_per_class=1)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(source / "imagenette2-160", arcname="imagenette2-160")
    return buffer.getvalue()


@pytest.fixture
def server(archive_bytes, monkeypatch):
    """torchvision's download_url replaced by one that writes the archive (only where no file is: a plain
    downloader, no md5 check of its own); the network counts as reachable; returns the list of downloads."""
    import torchvision.datasets.utils as tv_utils

    class Downloads(list):
        served = {"bytes": archive_bytes}

    downloads = Downloads()
    served = downloads.served

    def download_url(url, root, filename=None, md5=None, **kwargs):
        downloads.append(url)
        path = f"{root}/{filename}"
        try:
            with open(path, "xb") as f:
                f.write(served["bytes"])
        except FileExistsError:
            pass

    monkeypatch.setattr(tv_utils, "download_url", download_url)
    monkeypatch.setattr(imagenette_files, "IMAGENETTE_MD5", hashlib.md5(archive_bytes).hexdigest())
    monkeypatch.setattr(network, "reachable", lambda *a, **k: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("SELAGG_OFFLINE", raising=False)
    return downloads


def leftovers(root):
    return sorted(p.name for p in root.glob(".imagenette2-160.partial-*"))


def test_imagenette_is_downloaded_checked_and_unpacked_once(tmp_path, server):
    test = imagenette("test", root=tmp_path, image_size=32)
    assert len(test) == 10 and len(test.classes) == 10 and test[0][0].shape == (3, 32, 32)
    assert (tmp_path / "imagenette2-160" / "train").is_dir() and (tmp_path / "imagenette2-160.tgz").is_file()
    assert len(server) == 1 and not leftovers(tmp_path)
    train = load_dataset("imagenette", "train", root=tmp_path, image_size=32, max_images=10)
    assert len(server) == 1  # the second call finds the folder
    assert np.bincount(labels_of(train)).tolist() == [1] * 10


def test_a_truncated_archive_is_fetched_again(tmp_path, server, capsys):
    archive = tmp_path / "imagenette2-160.tgz"
    archive.write_bytes(server.served["bytes"][: len(server.served["bytes"]) // 2])  # a download cut short
    assert len(imagenette("val", root=tmp_path, image_size=32)) == 3  # 10% of 30 train images, by class
    assert len(server) == 1 and "downloaded again" in capsys.readouterr().err


def test_a_corrupt_download_is_deleted_and_said(tmp_path, server):
    server.served["bytes"] = b"<html>Access denied</html>"
    with pytest.raises(SelaggError, match="md5"):
        imagenette("train", root=tmp_path)
    assert not (tmp_path / "imagenette2-160.tgz").exists() and not (tmp_path / "imagenette2-160").exists()


def test_an_interrupted_unpacking_leaves_no_dataset(tmp_path, server, monkeypatch):
    real = tarfile.TarFile.extract
    extracted = []

    def extract_then_stop(self, member, *args, **kwargs):
        if len(extracted) == 12:
            raise KeyboardInterrupt
        extracted.append(member.name)
        return real(self, member, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "extract", extract_then_stop)
    with pytest.raises(KeyboardInterrupt):
        imagenette("train", root=tmp_path)
    assert len(extracted) == 12
    assert not (tmp_path / "imagenette2-160").exists() and not leftovers(tmp_path)
    monkeypatch.setattr(tarfile.TarFile, "extract", real)
    assert len(imagenette("test", root=tmp_path)) == 10
    assert len(server) == 1  # the archive was whole: unpacked again, not downloaded again


def test_a_partial_folder_left_by_a_killed_process_is_removed(tmp_path, server):
    stale = tmp_path / ".imagenette2-160.partial-x1y2" / "imagenette2-160" / "train" / "n01440764"
    stale.mkdir(parents=True)
    (stale / "half.JPEG").write_bytes(b"\xff\xd8")
    imagenette("test", root=tmp_path, image_size=32)
    assert not leftovers(tmp_path)
    stale.mkdir(parents=True)  # another one, now beside a finished dataset
    imagenette("test", root=tmp_path, image_size=32)
    assert not leftovers(tmp_path) and len(server) == 1


def test_an_archive_in_place_needs_no_network(tmp_path, server, archive_bytes, monkeypatch):
    (tmp_path / "imagenette2-160.tgz").write_bytes(archive_bytes)
    monkeypatch.setenv("SELAGG_OFFLINE", "1")
    assert len(imagenette("test", root=tmp_path, download=False)) == 10 and not server


def test_imagenette_says_what_to_do_when_it_cannot_get_it(tmp_path, server, monkeypatch):
    with pytest.raises(SelaggError, match="download=False"):
        imagenette("train", root=tmp_path, download=False)
    monkeypatch.setattr(network, "reachable", lambda *a, **k: False)
    start = time.monotonic()
    with pytest.raises(SelaggError, match="cannot reach.*tiny scale"):
        imagenette("train", root=tmp_path)
    assert time.monotonic() - start < network.CONNECT_TIMEOUT_S + 2 and not server


def test_an_unreachable_host_is_found_within_seconds(tmp_path, monkeypatch):
    """A real failed name lookup (the .invalid domain never resolves), not a patched answer."""
    monkeypatch.setattr(imagenette_files, "IMAGENETTE_URL", "https://imagenette.invalid/imagenette2-160.tgz")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("SELAGG_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(SelaggError, match="imagenette.invalid"):
        imagenette("train", root=tmp_path)
    # generous: how long a failed lookup takes is up to the machine's resolver, not to this package
    assert time.monotonic() - start < 20 and not (tmp_path / "imagenette2-160.tgz").exists()


def test_an_imagenette_folder_without_val_is_refused(tmp_path, server):
    make_folder(tmp_path / "imagenette2-160", {"train": {"a": 2, "b": 2}})
    with pytest.raises(SelaggError, match="lacks val/"):
        imagenette("train", root=tmp_path)
    assert not server


# ----------------------------------------------------------------------------- the registry
def test_the_registry_drives_load_dataset_and_its_message(folder, monkeypatch):
    assert DATASETS == ("cluttered-digits", "imagenette", "imagefolder:<path>") == tuple(available_datasets())
    monkeypatch.setitem(REGISTRY, "digits-again", data.DatasetSource(data._cluttered_digits_split, "the same lab"))
    assert len(load_dataset("digits-again", "val", n_images=5)) == 5
    with pytest.raises(SelaggError, match="digits-again"):
        load_dataset("mnist", "train")
    with pytest.raises(SelaggError, match="needs a path"):
        load_dataset("imagefolder", "train")
    with pytest.raises(SelaggError, match="does not take image_size; it takes n_images, seed, recipe"):
        load_dataset("cluttered-digits", "train", image_size=224)
    assert len(load_dataset(f"imagefolder:{folder}", "test", image_size=16)) == 20


def test_stratified_subset_of_a_plain_dataset():
    items = [(torch.zeros(1), label) for label in [0] * 30 + [1] * 10]
    subset = stratified_subset(items, 8, seed=0)
    assert np.bincount([subset[i][1] for i in range(8)]).tolist() == [6, 2]


def test_load_split_reads_a_scales_sizes(folder):
    from selagg_utils.config import ScaleSettings

    tiny = ScaleSettings("tiny", "tiny-mae", "tiny-jea", "tiny-random", "cluttered-digits", 8, 300, 120)
    train, test = data.load_split(tiny, "train"), data.load_split(tiny, "test")
    assert len(train) == 300 and len(test) == 120
    assert torch.equal(train.images, load_dataset("cluttered-digits", "train", n_images=300).images)
    with pytest.raises(SelaggError, match="takes no data_config"):
        data.load_split(tiny, "test", folder_transforms.default_data_config(32))
    full = ScaleSettings("full", "m", "j", "r", f"imagefolder:{folder}", 8, 9, 8)
    config = {**folder_transforms.default_data_config(24), "mean": (0.5, 0.5, 0.5)}
    capped = data.load_split(full, "test", config)
    assert len(capped) == 8 and np.bincount(labels_of(capped)).tolist() == [4, 2, 2]
    assert normalization(capped)[0] == (0.5, 0.5, 0.5) and capped[0][0].shape == (3, 24, 24)
    assert len(data.load_split(full, "train")) == 9
