"""The feature cache: keyed by everything that determines the tokens, atomic, refuses a wrong entry."""
import os

import pytest
import torch

from selagg_utils import SelaggError, config, extraction
from selagg_utils import features as feat
from selagg_utils.cache import entries as cache_entries
from selagg_utils.cache import keys as cache_keys
from selagg_utils.cache import store as token_store
from selagg_utils.data import load_dataset
from selagg_utils.extraction import ExtractOptions
from selagg_utils.models import load_backbone
from selagg_utils.scaleout.distributed import current_process

QUIET = ExtractOptions(progress=False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cache_keys.CACHE_ENV, str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def data():
    return load_dataset("cluttered-digits", "val", n_images=24, seed=0)


def test_extract_blocks_keeps_its_contract(data):
    model = load_backbone("tiny-random")
    options = ExtractOptions(batch_size=10, progress=False, dtype=torch.float32)
    (tokens,), labels = extraction.extract_blocks(model, data, [None], options)
    assert tokens.shape == (24, 65, 128) and tokens.dtype == torch.float32
    assert torch.equal(labels, data.labels)


def test_cached_tokens_are_extracted_once_then_loaded(cache, data, monkeypatch):
    first = feat.cached_tokens("tiny-random", data, options=ExtractOptions(batch_size=10, progress=False))
    assert first.tokens.dtype == torch.float16 and first.tokens.shape == (24, 65, 128)
    assert len(list(cache.glob("*.safetensors"))) == 1
    monkeypatch.setattr(cache_entries, "extract_blocks", lambda *a, **k: pytest.fail("extracted again"))
    again = feat.cached_tokens("tiny-random", data, options=QUIET)
    assert torch.equal(again.tokens, first.tokens) and again.key == first.key
    assert (again.num_prefix_tokens, again.has_cls, again.grid_size) == (1, True, (8, 8))


def test_last_block_equals_forward_features(cache, data):
    model = load_backbone("tiny-random")
    cached = feat.cached_tokens("tiny-random", data, options=QUIET)
    with torch.no_grad():
        expected = model.forward_features(data.images).half()
    assert torch.equal(cached.tokens, expected)


def test_several_blocks_in_one_pass_and_distinct_keys(cache, data):
    sets = feat.cached_blocks("tiny-random", data, [2, 6, None], options=QUIET)
    assert len({cache_keys.key_digest(s.key) for s in sets}) == 3
    assert torch.equal(sets[1].tokens, sets[2].tokens)  # block 6 with the final norm is the last block
    assert not torch.equal(sets[0].tokens, sets[1].tokens)


def test_key_depends_on_split_size_and_block(data):
    other = load_dataset("cluttered-digits", "val", n_images=25, seed=0)
    k = cache_keys.cache_key("tiny-random", data, "last", True)
    assert k != cache_keys.cache_key("tiny-random", other, "last", True)
    assert k != cache_keys.cache_key("tiny-random", data, 3, True)
    assert len(k["sha256"]) == 64


@pytest.mark.parametrize("unnamed", [True, False], ids=["unnamed-temporary", "named-temporary"])
def test_interrupted_extraction_leaves_nothing_loadable(cache, data, monkeypatch, unnamed):
    if unnamed and not token_store.UNNAMED_TEMPORARIES:
        pytest.skip("this system has no unnamed temporary files (O_TMPFILE)")
    monkeypatch.setattr(token_store, "UNNAMED_TEMPORARIES", unnamed)
    real, calls = extraction.tokens_after, []

    def interrupted_on_third_batch(*args, **kwargs):  # Ctrl-C after two batches went into the entry file
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(extraction, "tokens_after", interrupted_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        feat.cached_tokens("tiny-random", data, options=ExtractOptions(batch_size=8, progress=False))
    assert len(calls) == 3 and os.listdir(cache) == []  # no entry, no temporary file, no lock
    monkeypatch.setattr(extraction, "tokens_after", real)
    with torch.no_grad():
        expected = load_backbone("tiny-random").forward_features(data.images).half()
    again = feat.cached_tokens("tiny-random", data, options=ExtractOptions(batch_size=8, progress=False))
    assert torch.equal(again.tokens, expected)


def test_entry_with_another_key_is_refused(cache, data):
    other = load_dataset("cluttered-digits", "val", n_images=12, seed=0)
    a = feat.cached_tokens("tiny-random", data, options=QUIET)
    b = feat.cached_tokens("tiny-random", other, options=QUIET)
    os.replace(cache_keys.entry_path(b.key), cache_keys.entry_path(a.key))  # a stale or renamed file
    with pytest.raises(SelaggError, match="another request"):
        feat.cached_tokens("tiny-random", data, options=QUIET)


def test_unknown_block_raises(cache, data):
    with pytest.raises(SelaggError, match="Block 9 does not exist"):
        feat.cached_tokens("tiny-random", data, block=9, options=QUIET)
    with pytest.raises(SelaggError, match=r"block=ExtractOptions\(.*\) is not accepted.*options=ExtractOptions"):
        feat.cached_tokens("tiny-random", data, QUIET)  # the options where the block goes
    assert os.listdir(cache) == []


def test_options_the_cache_cannot_honour_are_refused_before_any_work(cache, data):
    for call in (feat.cached_tokens, feat.cached_blocks, feat.pooled_features):
        with pytest.raises(SelaggError, match=r"The feature cache keeps float16 tokens, so options.dtype=torch.float32"):
            call("tiny-random", data, options=ExtractOptions(dtype=torch.float32, progress=False))
        with pytest.raises(SelaggError, match=r"options must be an instance of extraction.ExtractOptions, not dict"):
            call("tiny-random", data, options={"batch_size": 8})
    assert os.listdir(cache) == []


def test_no_device_means_this_process_s_and_keys_the_same_entry(cache, data):
    assert config.process_device() == current_process().device == torch.device("cpu")
    assert extraction.resolved_options().device == config.process_device()
    assert extraction.resolved_options(ExtractOptions(device="cpu")).device == "cpu"  # a device given is kept
    own = feat.cached_tokens("tiny-random", data, options=QUIET)
    named = feat.cached_tokens("tiny-random", data, options=ExtractOptions(device="cpu", progress=False))
    assert own.key == named.key and own.key["compute"] == "float32" and len(os.listdir(cache)) == 1


def test_token_set_views(cache, data):
    ts = feat.cached_tokens("tiny-random", data, options=QUIET)  # mapped from its file
    assert ts.cls.shape == (24, 128) and ts.mean_patches.shape == (24, 128) and ts.patches.shape == (24, 64, 128)
    assert len(ts.subset(torch.arange(5))) == 5
    with torch.no_grad():
        full = load_backbone("tiny-random").forward_features(data.images).half()
    index = torch.tensor([3, 0, 17])
    sub = ts.subset(index)
    assert torch.equal(sub.tokens, full[index]) and torch.equal(sub.labels, data.labels[index])
    assert torch.equal(ts.cls, full[:, 0].float()) and torch.equal(ts.patches, full[:, 1:])
    assert torch.equal(ts.mean_patches, full[:, 1:].float().mean(1))
