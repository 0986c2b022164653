"""The embedded cluttered-digits dataset."""
import numpy as np
import pytest
import torch

from selagg_utils import SelaggError
from selagg_utils.data import (
    DigitsRecipe,
    DigitStream,
    _upscaled_sources,
    cluttered_digits,
    load_dataset,
    render_cluttered_digits,
    source_indices,
)


def test_same_seed_same_images_and_other_seed_differs():
    a = load_dataset("cluttered-digits", "val", n_images=300, seed=3)
    b = load_dataset("cluttered-digits", "val", n_images=300, seed=3)
    c = load_dataset("cluttered-digits", "val", n_images=300, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.object_masks, b.object_masks)
    assert not torch.equal(a.images, c.images)


def test_splits_draw_from_disjoint_source_digits():
    parts = [set(source_indices(s).tolist()) for s in ("train", "val", "test")]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 1797
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


def test_shapes_labels_and_minority_object():
    ds = cluttered_digits("test", n_images=500)
    assert ds.images.shape == (500, 1, 32, 32) and ds.images.dtype == torch.float32
    assert ds.object_masks.shape == (500, 8, 8) and ds.object_masks.dtype == torch.bool
    assert set(ds.labels.tolist()) == set(range(10))
    share = ds.object_masks.float().mean().item()
    assert 0.1 < share < 0.4  # the digit covers a minority of the patches
    image, label = ds[0]
    assert image.shape == (1, 32, 32) and isinstance(label, int)


def test_mask_covers_exactly_the_digits_ink_box():
    """Render without clutter or noise: the mask's patches are those the ink's box touches."""
    recipe = DigitsRecipe(clutter_min=0, clutter_max=0, noise_std=0.0)
    sources, labels = _upscaled_sources(recipe.digit_size)
    images, _, masks = render_cluttered_digits(sources, labels, 200, np.random.default_rng(0), recipe)
    ink = images > recipe.ink_threshold
    for img_ink, mask in zip(ink, masks):
        rows, cols = np.nonzero(img_ink)
        expected = np.zeros((8, 8), bool)
        expected[rows.min() // 4: rows.max() // 4 + 1, cols.min() // 4: cols.max() // 4 + 1] = True
        assert np.array_equal(mask, expected)


def test_clutter_never_touches_the_digit():
    """Pixels outside the digit's 16x16 box may hold clutter; inside the box only the digit is drawn."""
    recipe = DigitsRecipe(noise_std=0.0)
    sources, labels = _upscaled_sources(recipe.digit_size)
    rng = np.random.default_rng(1)
    clean = render_cluttered_digits(sources, labels, 300, np.random.default_rng(1),
                                    DigitsRecipe(noise_std=0.0, clutter_min=0, clutter_max=0))[0]
    cluttered = render_cluttered_digits(sources, labels, 300, rng, recipe)[0]
    # Same seed -> same digit placements; clutter only adds ink where the clean image is empty.
    changed = cluttered != clean
    assert changed.any()
    assert (clean[changed] == 0).all()


def test_stream_gives_fresh_batches():
    stream = DigitStream(batch_size=16, seed=0)
    (x1, y1), (x2, _) = next(stream), next(stream)
    assert x1.shape == (16, 1, 32, 32) and y1.shape == (16,)
    assert not torch.equal(x1, x2)


def test_masks_triples():
    ds = cluttered_digits("val", n_images=10)
    image, label, mask = ds.with_object_masks()[0]
    assert mask.shape == (8, 8)


@pytest.mark.parametrize("call, words", [
    (lambda: load_dataset("mnist", "train"), "Unknown dataset"),
    (lambda: load_dataset("cluttered-digits", "dev"), "Unknown split"),
    (lambda: cluttered_digits("train", n_images=0), "positive"),
    (lambda: cluttered_digits("train", recipe=DigitsRecipe(patch_size=5)), "not divisible"),
    (lambda: load_dataset("imagefolder:/nonexistent", "train"), "No image folder"),
])
def test_bad_requests_get_one_sentence(call, words):
    with pytest.raises(SelaggError, match=words):
        call()


def test_image_folder_at_full_scale(tmp_path):
    """The full-scale loader on a small local folder: train/val carved from train, test from val."""
    from PIL import Image

    for part in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / part / cls).mkdir(parents=True)
            for i in range(5):
                Image.new("RGB", (40, 40), (i * 40, 10, 10)).save(tmp_path / part / cls / f"{i}.png")
    train = load_dataset(f"imagefolder:{tmp_path}", "train", image_size=32)
    val = load_dataset(f"imagefolder:{tmp_path}", "val", image_size=32)
    test = load_dataset(f"imagefolder:{tmp_path}", "test", image_size=32)
    assert len(train) + len(val) == 10 and len(test) == 10
    assert set(train.indices).isdisjoint(val.indices)
    assert train[0][0].shape == (3, 32, 32)


def test_imagenette_without_network_says_so_at_once(tmp_path, monkeypatch):
    """Offline mode (or no route to the host) gives one sentence within seconds, before any download."""
    import time

    import torchvision.datasets.utils as tv_utils

    calls = []
    monkeypatch.setattr(tv_utils, "download_url", lambda *a, **k: calls.append(a))
    monkeypatch.setenv("SELAGG_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(SelaggError, match="offline mode.*tiny scale"):
        load_dataset("imagenette", "train", root=tmp_path)
    assert time.monotonic() - start < 5 and not calls
