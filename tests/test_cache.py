"""The feature cache's identity and integrity: two different inputs never share an entry, a damaged
entry is never served, and a bad location is refused before any work is done."""
import json
import os
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selagg_utils import SelaggError
from selagg_utils import features as feat
from selagg_utils.cache import entries as cache_entries
from selagg_utils.cache import keys as cache_keys
from selagg_utils.cache import store as token_store
from selagg_utils.cache.files import host_tag
from selagg_utils.data import ClutteredDigits, load_dataset
from selagg_utils.extraction import ExtractOptions
from selagg_utils.models import load_backbone

QUIET = ExtractOptions(progress=False)


@pytest.fixture(scope="module")
def data():
    return load_dataset("cluttered-digits", "val", n_images=12, seed=0)


@pytest.fixture(scope="module")
def model():
    return load_backbone("tiny-random")


def no_extraction(monkeypatch):
    monkeypatch.setattr(cache_entries, "extract_blocks", lambda *a, **k: pytest.fail("extracted although it should not"))


# ----------------------------------------------------------------------------- identity
def test_two_tensor_datasets_of_one_length_do_not_share_an_entry(cache, data):
    first = torch.utils.data.TensorDataset(data.images, data.labels)
    second = torch.utils.data.TensorDataset(data.images.flip(-1), (data.labels + 1) % 10)
    a = feat.cached_tokens("tiny-random", first, options=QUIET)
    b = feat.cached_tokens("tiny-random", second, options=QUIET)
    assert torch.equal(b.labels, second.tensors[1]) and not torch.equal(a.tokens, b.tokens)


def test_subsets_of_two_splits_with_the_same_indices_do_not_share_an_entry(cache):
    val = load_dataset("cluttered-digits", "val", n_images=12, seed=0)
    test = load_dataset("cluttered-digits", "test", n_images=12, seed=0)
    a = feat.cached_tokens("tiny-random", torch.utils.data.Subset(val, range(6)), options=QUIET)
    b = feat.cached_tokens("tiny-random", torch.utils.data.Subset(test, range(6)), options=QUIET)
    assert torch.equal(b.labels, test.labels[:6]) and not torch.equal(a.tokens, b.tokens)


def test_a_dataset_built_by_hand_under_a_recipe_does_not_reuse_the_recipes_entry(cache, data):
    feat.cached_tokens("tiny-random", data, options=QUIET)
    forged = ClutteredDigits(data.images.flip(-2), data.labels.flip(0), data.object_masks, data.split, data.seed)
    assert forged.key == data.key
    got = feat.cached_tokens("tiny-random", forged, options=QUIET)
    assert torch.equal(got.labels, forged.labels)


class Items(torch.utils.data.Dataset):
    """A plain dataset: no recipe, no tensors to read, only items."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def test_plain_datasets_are_keyed_by_their_items_or_by_the_callers_key(cache, data):
    a = feat.cached_tokens("tiny-random", Items(data.images, data.labels), options=QUIET)
    b = feat.cached_tokens("tiny-random", Items(data.images * 0.5, data.labels), options=QUIET)
    assert not torch.equal(a.tokens, b.tokens)
    named = feat.cached_tokens("tiny-random", Items(data.images, data.labels), options=QUIET, data_key="val-12")
    assert named.key["data"] == {"caller_key": "val-12", "n_images": 12}
    with pytest.raises(SelaggError, match="data_key=''"):
        feat.cached_tokens("tiny-random", data, options=QUIET, data_key="")


def test_a_model_passed_in_is_keyed_by_its_own_weights(cache, data, model):
    other = load_backbone("tiny-mae")
    under_random_name = feat.cached_tokens("tiny-random", data, options=QUIET, model=other)
    by_name = feat.cached_tokens("tiny-random", data, options=QUIET)
    assert not torch.equal(under_random_name.tokens, by_name.tokens)
    assert feat.cached_tokens("tiny-random", data, options=QUIET, model=model).key["state_sha256"] == \
        cache_keys.state_digest(load_backbone("tiny-random"))


def test_random_and_pretrained_weights_of_one_timm_name_have_different_keys(monkeypatch, data):
    monkeypatch.setenv("SELAGG_SCALE", "full")
    pretrained = cache_keys.backbone_identity("vit_base_patch16_224.mae")
    monkeypatch.setenv("SELAGG_PRETRAINED", "0")
    random = cache_keys.backbone_identity("vit_base_patch16_224.mae")
    assert pretrained["weights"] == "pretrained" and pretrained["tag"] == "mae"
    assert random["weights"] == "random" and random["seed"] == 0 and random != pretrained
    assert cache_keys.backbone_identity("random:vit_base_patch16_224.mae")["weights"] == "random"


def test_random_timm_weights_are_the_same_every_time():
    a = load_backbone("vit_tiny_patch16_224", pretrained=False)
    torch.rand(3)  # whatever the caller's random state
    b = load_backbone("vit_tiny_patch16_224", pretrained=False)
    assert cache_keys.state_digest(a) == cache_keys.state_digest(b)


# ----------------------------------------------------------------------------- integrity
def test_a_changed_entry_is_extracted_again_with_one_line(cache, data, capsys):
    first = feat.cached_tokens("tiny-random", data, options=QUIET)
    expected = first.tokens.clone()  # loaded tokens map the file, and this test changes the file in place
    path = cache_keys.entry_path(first.key)
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0x40  # one bit of one token
    path.write_bytes(bytes(raw))
    again = feat.cached_tokens("tiny-random", data, options=QUIET)
    assert torch.equal(again.tokens, expected)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checksum does not match" in err
    assert token_store.read_entry(path)  # the rebuilt entry verifies


def test_a_truncated_entry_is_extracted_again(cache, data, capsys):
    first = feat.cached_tokens("tiny-random", data, options=QUIET)
    expected = first.tokens.clone()  # the mapped pages of a truncated file cannot be read any more
    path = cache_keys.entry_path(first.key)
    path.write_bytes(path.read_bytes()[:1000])
    again = feat.cached_tokens("tiny-random", data, options=QUIET)
    assert torch.equal(again.tokens, expected)
    assert f"The cache entry {path} is damaged (unreadable" in capsys.readouterr().err


def test_an_intact_entry_of_another_request_is_refused_naming_the_file(cache, data):
    other = load_dataset("cluttered-digits", "val", n_images=6, seed=0)
    a = feat.cached_tokens("tiny-random", data, options=QUIET)
    b = feat.cached_tokens("tiny-random", other, options=QUIET)
    os.replace(cache_keys.entry_path(b.key), cache_keys.entry_path(a.key))
    with pytest.raises(SelaggError, match=f"{cache_keys.entry_path(a.key)} holds the tokens of another request"):
        feat.cached_tokens("tiny-random", data, options=QUIET)


@pytest.fixture(scope="module")
def genuine(tmp_path_factory, data, model):
    """One intact entry: its path, bytes and tokens."""
    folder = tmp_path_factory.mktemp("genuine")
    entry = feat.cached_tokens("tiny-random", data, options=QUIET, directory=folder, model=model)
    path = cache_keys.entry_path(entry.key, folder)
    kept = feat.TokenSet(entry.tokens.clone(), entry.labels.clone(), entry.layout, entry.key)  # in memory: the test rewrites the mapped file in place
    return path, path.read_bytes(), kept


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.one_of(st.none(), st.integers(0, 10 ** 6)),
       flips=st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(1, 255)), min_size=0, max_size=3))
@pytest.mark.slow
def test_damage_at_random_offsets_gives_the_right_tokens_or_the_sentence(genuine, data, model, cut, flips):
    path, raw, entry = genuine
    damaged = bytearray(raw)
    for offset, xor in flips:
        damaged[offset % len(raw)] ^= xor
    if cut is not None:
        damaged = damaged[:cut % len(raw)]
    path.write_bytes(bytes(damaged))
    try:
        got = feat.cached_tokens("tiny-random", data, options=QUIET, directory=path.parent, model=model)
    except SelaggError as err:  # a flip that turned it into a valid entry of another request
        assert str(path) in str(err) and "another request" in str(err)
    else:
        assert torch.equal(got.tokens, entry.tokens) and torch.equal(got.labels, entry.labels)
        assert (got.num_prefix_tokens, got.has_cls, got.grid_size) == (1, True, (8, 8))
    path.write_bytes(raw)


def test_a_file_where_the_folder_should_be_is_refused_before_extraction(tmp_path, data, monkeypatch):
    blocker = tmp_path / "features"
    blocker.write_text("not a folder")
    no_extraction(monkeypatch)
    with pytest.raises(SelaggError, match="is a file, not a folder"):
        feat.cached_tokens("tiny-random", data, options=QUIET, directory=blocker)
    with pytest.raises(SelaggError, match="cannot be written"):  # a folder below that file
        feat.cached_tokens("tiny-random", data, options=QUIET, directory=blocker / "sub")


def read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write: chmod for a normal user; for root (who ignores modes), one in /proc."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    if not Path("/proc/self").is_dir():
        pytest.skip("running as root without /proc: no folder here refuses root's writes")
    return Path("/proc/self")


def test_a_read_only_folder_is_refused_before_extraction(tmp_path, data, monkeypatch):
    folder = read_only_folder(tmp_path)
    no_extraction(monkeypatch)
    with pytest.raises(SelaggError, match="cannot be written"):
        feat.cached_tokens("tiny-random", data, options=QUIET, directory=folder)


def test_a_disk_that_refuses_the_write_keeps_the_tokens(cache, data, file_size_limit, capsys):
    file_size_limit(50_000)  # the entry needs about 200 kB
    try:
        got = feat.cached_tokens("tiny-random", data, options=QUIET)
    finally:
        file_size_limit(None)  # back to the usual limit before anything else is written
    assert torch.equal(got.labels, data.labels) and got.tokens.shape == (12, 65, 128)
    assert "File too large" in capsys.readouterr().err and list(cache.iterdir()) == []


def test_a_disk_that_refuses_the_file_halfway_keeps_every_token(cache, data, file_size_limit, capsys):
    with torch.no_grad():
        expected = load_backbone("tiny-random").forward_features(data.images).half()
    file_size_limit(100_000)  # room for the header, the labels and a batch and a half of tokens
    try:
        got = feat.cached_tokens("tiny-random", data, options=ExtractOptions(batch_size=4, progress=False))
    finally:
        file_size_limit(None)
    assert torch.equal(got.tokens, expected) and torch.equal(got.labels, data.labels)  # written part read back
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "File too large" in err and list(cache.iterdir()) == []


def test_orphaned_temporary_files_are_removed_and_live_ones_kept(cache, data):
    cache.mkdir(parents=True)
    dead = cache / f".abc.safetensors.{host_tag()}-999999999.x1.tmp"  # no process has this id
    live = cache / f".abc.safetensors.{host_tag()}-{os.getpid()}.x2.tmp"
    foreign = cache / ".abc.safetensors.00000000-1.x3.tmp"  # another machine's, recent
    for f in (dead, live, foreign):
        f.write_bytes(b"partial")
    feat.cached_tokens("tiny-random", data, options=QUIET)
    assert not dead.exists() and live.exists() and foreign.exists()


def test_non_finite_images_are_named_and_nothing_is_cached(cache, data):
    images = data.images.clone()
    images[7, 0, 3, 3] = float("nan")
    with pytest.raises(SelaggError, match="Image 7 contains NaN"):
        feat.cached_tokens("tiny-random", torch.utils.data.TensorDataset(images, data.labels),
                           options=ExtractOptions(batch_size=4, progress=False))
    assert not list(cache.glob("*.safetensors"))


def test_empty_datasets_and_bad_batch_sizes_are_refused(cache, data):
    with pytest.raises(SelaggError, match="holds no images"):
        feat.cached_tokens("tiny-random", torch.utils.data.Subset(data, []), options=QUIET)
    with pytest.raises(SelaggError, match="batch_size=0"):
        feat.cached_tokens("tiny-random", data, options=ExtractOptions(batch_size=0, progress=False))
    with pytest.raises(SelaggError, match="floating torch dtype"):
        ExtractOptions(dtype=torch.int8)


def test_an_image_folder_is_keyed_by_its_files(tmp_path):
    from PIL import Image

    from selagg_utils.imagenette.folders import image_folder

    for cls in ("a", "b"):
        (tmp_path / "val" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), (40 * i, 100, 0)).save(tmp_path / "val" / cls / f"{i}.png")
    before = cache_keys.dataset_identity(image_folder(tmp_path, "test", image_size=32))
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "val" / "b" / "1.png")  # same name, new content
    after = cache_keys.dataset_identity(image_folder(tmp_path, "test", image_size=32))
    assert before["data"]["n_images"] == 4 and before["data"] != after["data"]
    assert "Resize" in json.dumps(before["transform"])  # the transform, described in full


def test_large_entries_are_verified_once_and_again_after_any_change(cache, data, monkeypatch, capsys):
    monkeypatch.setattr(token_store, "VERIFY_EVERY_LOAD_BYTES", 0)  # every entry counts as large here
    first = feat.cached_tokens("tiny-random", data, options=QUIET)
    expected = first.tokens.clone()  # the file is changed in place below, and loaded tokens map it
    checks = []
    real = token_store.file_checksum
    monkeypatch.setattr(token_store, "file_checksum", lambda *a: checks.append(1) or real(*a))
    feat.cached_tokens("tiny-random", data, options=QUIET)
    feat.cached_tokens("tiny-random", data, options=QUIET)
    assert len(checks) == 1  # verified on the first load only
    path = cache_keys.entry_path(first.key)
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0x01
    time.sleep(0.05)  # beyond the file system clock's granularity, so that the write gets a new mtime
    with open(path, "r+b") as f:  # changed in place: same inode and size, a new mtime
        f.write(bytes(raw))
    again = feat.cached_tokens("tiny-random", data, options=QUIET)
    assert torch.equal(again.tokens, expected) and "checksum does not match" in capsys.readouterr().err
