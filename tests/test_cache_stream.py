"""The streamed cache: entries written batch by batch equal the old in-memory extraction bit for bit, stay
valid safetensors files, load as maps of their files, are verified by their checksum, pool without
keeping tokens, check the disk before the work, key the forward pass's precision, and survive kill -9
in every phase of the write."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from selagg_utils import SelaggError, extraction
from selagg_utils import features as feat
from selagg_utils.cache import entries as cache_entries
from selagg_utils.cache import keys as cache_keys
from selagg_utils.cache import store as token_store
from selagg_utils.cache.files import tensors_digest
from selagg_utils.data import cluttered_digits
from selagg_utils.extraction import ExtractOptions
from selagg_utils.models import TokenLayout, load_backbone, tiny_vit

ROOT = Path(__file__).resolve().parents[1]
QUIET = ExtractOptions(progress=False)


@pytest.fixture(scope="module")
def data():
    return cluttered_digits("val", n_images=64)


@pytest.fixture(scope="module")
def model():
    return load_backbone("tiny-mae")


@torch.inference_mode()
def in_memory_extraction(model, data, blocks, batch_size):
    """The old extraction: every batch's float16 tokens kept in memory, then concatenated."""
    per_block, labels = [[] for _ in blocks], []
    for start in range(0, len(data), batch_size):
        images = data.images[start:start + batch_size]
        for store, tokens in zip(per_block, extraction.tokens_after(model, images, blocks)):
            store.append(tokens.half())
        labels.append(data.labels[start:start + batch_size])
    return [torch.cat(s) for s in per_block], torch.cat(labels)


def stored_tensors(path):
    """An entry's tensors and metadata as safetensors itself reads them (no code of the package)."""
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, f.metadata()


def tensor_offsets(path, name):
    """Where a tensor's bytes start and end in an entry file, from its safetensors header."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8:8 + size])[name]["data_offsets"]
    return 8 + size + start, 8 + size + end


def no_extraction(monkeypatch):
    monkeypatch.setattr(extraction, "token_batches", lambda *a, **k: pytest.fail("extracted although it should not"))


# ----------------------------------------------------------------------------- the streamed file
def test_streamed_entries_equal_the_in_memory_extraction_bit_for_bit(cache, data, model):
    blocks = [2, None]
    # 7 batches, the last short
    sets = feat.cached_blocks("tiny-mae", data, blocks, ExtractOptions(batch_size=10, progress=False))
    expected, labels = in_memory_extraction(model, data, blocks, 10)
    for ts, tokens in zip(sets, expected):
        state, meta = stored_tensors(cache_keys.entry_path(ts.key))  # each block streamed to its own file
        assert set(state) == {"tokens", "labels"} and state["tokens"].dtype == torch.float16
        assert torch.equal(state["tokens"], tokens) and torch.equal(state["labels"], labels)
        assert torch.equal(ts.tokens, tokens) and torch.equal(ts.labels, data.labels)
        assert json.loads(meta["key"]) == json.loads(json.dumps(ts.key, default=str))
        assert meta["checksum"] == token_store.entry_checksum(state, meta)  # the same checksum computed in memory
    assert not torch.equal(expected[0], expected[1])
    assert sorted(p.name for p in cache.iterdir()) == sorted(cache_keys.entry_path(s.key).name for s in sets)


def test_an_entry_is_a_valid_safetensors_file_with_aligned_tensors(cache, data):
    ts = feat.cached_tokens("tiny-mae", data, options=ExtractOptions(batch_size=16, progress=False))
    path = cache_keys.entry_path(ts.key)
    loaded = load_file(str(path))  # safetensors' full validation of header, offsets and size
    assert torch.equal(loaded["tokens"], ts.tokens) and torch.equal(loaded["labels"], ts.labels)
    for name, dtype in (("labels", torch.int64), ("tokens", torch.float16)):
        start, end = tensor_offsets(path, name)
        assert start % dtype.itemsize == 0 and end - start == loaded[name].numel() * dtype.itemsize
    assert tensor_offsets(path, "tokens")[1] == path.stat().st_size


def test_save_entry_writes_the_same_file_as_a_streamed_extraction(cache, data):
    ts = feat.cached_tokens("tiny-mae", data, options=ExtractOptions(batch_size=16, progress=False))
    path = cache_keys.entry_path(ts.key)
    copy = cache / "copy.safetensors"
    cache_entries.save_entry(copy, feat.TokenSet(ts.tokens.clone(), ts.labels.clone(), ts.layout, ts.key))
    assert copy.read_bytes() == path.read_bytes()


# ----------------------------------------------------------------------------- mapped reads
def mapped_files():
    """The files this process maps, by address range."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi, parts[5]))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc/self/maps")
def test_a_loaded_entry_maps_its_file_and_writes_stay_private(cache, data, monkeypatch):
    first = feat.cached_tokens("tiny-mae", data, options=QUIET)
    monkeypatch.setattr(extraction, "token_batches", lambda *a, **k: pytest.fail("extracted again"))
    ts = feat.cached_tokens("tiny-mae", data, options=QUIET)
    path = str(cache_keys.entry_path(ts.key))
    address = ts.tokens.data_ptr()
    assert any(lo <= address < hi and name == path for lo, hi, name in mapped_files())  # a map, not a copy
    assert torch.equal(ts.tokens, first.tokens)
    expected = ts.tokens.clone()
    ts.tokens[0, 0, 0] = 1000.0  # copy-on-write: the file does not change
    assert torch.equal(feat.cached_tokens("tiny-mae", data, options=QUIET).tokens, expected)
    assert torch.equal(load_file(path)["tokens"], expected)
    sub = ts.subset(torch.tensor([5, 2]))  # the views of a TokenSet work on the map
    assert torch.equal(sub.tokens, expected[[5, 2]]) and sub.labels.tolist() == data.labels[[5, 2]].tolist()
    assert torch.equal(ts.cls[1:], expected[1:, 0].float()) and ts.patches.shape == (64, 64, 128)


# ----------------------------------------------------------------------------- the checksum
@pytest.mark.parametrize("where", ["tokens", "labels", "key"])
def test_the_checksum_catches_one_flipped_byte(cache, data, where, capsys):
    ts = feat.cached_tokens("tiny-mae", data, options=QUIET)
    expected = ts.tokens.clone()
    path = cache_keys.entry_path(ts.key)
    raw = bytearray(path.read_bytes())
    if where == "key":  # the stored key names the split: a changed letter that keeps the JSON valid
        offset = raw.index(b"cluttered-digits")
    else:
        start, end = tensor_offsets(path, where)
        offset = (start + end) // 2 - (start + end) // 2 % 8
    raw[offset] ^= 0x01
    os.replace(bytes_to_file(path.with_suffix(".x"), raw), path)
    with pytest.raises(token_store.DamagedEntry, match="checksum does not match"):
        token_store.read_entry(path)
    assert torch.equal(feat.cached_tokens("tiny-mae", data, options=QUIET).tokens, expected)
    assert "checksum does not match" in capsys.readouterr().err
    assert token_store.read_entry(path)  # extracted again, and verified


def bytes_to_file(path, raw):
    path.write_bytes(bytes(raw))
    return path


def test_an_entry_of_the_previous_format_is_extracted_again_not_misread(cache, data, capsys):
    ts = feat.cached_tokens("tiny-mae", data, options=QUIET)
    expected = ts.tokens.clone()
    assert ts.key["format"] == cache_keys.CACHE_FORMAT == 3
    path = cache_keys.entry_path(ts.key)
    state = {"tokens": (expected + 1).contiguous(), "labels": ts.labels.clone()}
    meta = {"key": cache_keys.key_text(ts.key), "num_prefix_tokens": "1", "has_cls": "1", "grid_size": "[8, 8]"}
    meta["checksum"] = tensors_digest(state, json.dumps(meta, sort_keys=True))  # format 2's checksum
    save_file(state, str(path.with_suffix(".x")), metadata=meta)
    os.replace(path.with_suffix(".x"), path)
    assert torch.equal(feat.cached_tokens("tiny-mae", data, options=QUIET).tokens, expected)
    assert "checksum does not match" in capsys.readouterr().err


# ----------------------------------------------------------------------------- pooling
def test_mean_patches_in_chunks_equals_the_direct_mean(data, model, monkeypatch):
    with torch.no_grad():
        tokens = model.forward_features(data.images).half()
    ts = feat.TokenSet(tokens, data.labels, TokenLayout(True, 0, (8, 8)))
    direct = tokens[:, 1:].float().mean(1)
    monkeypatch.setattr(extraction, "CHUNK_BYTES", 5 * 64 * 128 * 4)  # 5 images a chunk: 13 chunks, the last short
    assert extraction.images_per_chunk(ts.patches) == 5
    assert torch.equal(ts.mean_patches, direct)


@pytest.mark.slow
def test_mean_patches_never_converts_the_whole_split(tmp_path):
    code = """
    import resource, torch
    from selagg_utils.features import TokenSet
    from selagg_utils.models import TokenLayout
    tokens = torch.ones(1, 65, 128, dtype=torch.float16).expand(20000, 65, 128)  # 0.66 GB as float32, 16 kB here
    ts = TokenSet(tokens, torch.zeros(20000, dtype=torch.int64), TokenLayout(True, 0, (8, 8)))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mean = ts.mean_patches
    assert mean.shape == (20000, 128) and bool((mean == 1).all())
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) < 300e6  # chunks of 64 MB and a 10 MB result, never 0.66 GB at once


def test_pooled_features_equal_pooling_the_cached_tokens(cache, data, monkeypatch):
    pooled = feat.pooled_features("tiny-mae", data, options=ExtractOptions(batch_size=10, progress=False))
    tokens = feat.cached_tokens("tiny-mae", data, options=ExtractOptions(batch_size=10, progress=False))
    assert pooled.cls.dtype == pooled.mean.dtype == torch.float32 and pooled.mean.shape == (64, 128)
    assert torch.equal(pooled.cls, tokens.cls) and torch.equal(pooled.mean, tokens.mean_patches)
    assert torch.equal(pooled.labels, data.labels) and pooled.key["pooled"] is True
    assert pooled.key != tokens.key and {k: v for k, v in pooled.key.items() if k not in ("pooled", "dtype")} == \
        {k: v for k, v in tokens.key.items() if k != "dtype"}
    state, _ = stored_tensors(cache_keys.entry_path(pooled.key))  # its own small entry, no tokens in it
    assert set(state) == {"cls", "mean", "labels"}
    monkeypatch.setattr(extraction, "token_batches", lambda *a, **k: pytest.fail("extracted again"))
    again = feat.pooled_features("tiny-mae", data, options=QUIET)
    assert torch.equal(again.mean, pooled.mean) and torch.equal(again.cls, pooled.cls)


def test_pooled_features_of_a_model_with_registers_and_no_cls(cache, data):
    torch.manual_seed(0)
    net = tiny_vit(class_token=False, reg_tokens=2, global_pool="avg").eval()
    pooled = feat.pooled_features("no-cls", data, options=ExtractOptions(batch_size=16, progress=False), model=net)
    with torch.no_grad():
        tokens = net.forward_features(data.images).half()
    assert tokens.shape[1] == 66 and pooled.cls is None
    assert torch.equal(pooled.mean, tokens[:, 2:].float().mean(1))  # the two registers left out
    assert torch.equal(feat.pooled_features("no-cls", data, options=QUIET, model=net).mean, pooled.mean)


def test_pooling_keeps_no_tokens_of_earlier_batches(cache, data, monkeypatch):
    kept = []
    real = cache_entries.pooled_rows
    monkeypatch.setattr(cache_entries, "pooled_rows", lambda tokens, *a: kept.append(tokens.shape) or real(tokens, *a))
    feat.pooled_features("tiny-mae", data, options=ExtractOptions(batch_size=16, progress=False))
    assert kept == [(16, 65, 128)] * 4  # one batch of tokens at a time, pooled as it comes


# ----------------------------------------------------------------------------- the disk, the loader, the precision
def test_too_little_disk_space_is_one_sentence_before_any_extraction(cache, data, monkeypatch):
    import shutil

    needed, free = cache_keys.token_entry_bytes(64, 65, 128), [cache_keys.token_entry_bytes(64, 65, 128) - 1]
    usage = shutil.disk_usage(Path("/"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free[0]))
    no_extraction(monkeypatch)
    with pytest.raises(SelaggError) as err:
        feat.cached_tokens("tiny-mae", data, options=QUIET)
    sentence = str(err.value)
    assert sentence.count(". ") == 0 and sentence.endswith(".")
    assert f"needs {cache_keys.size_text(needed)}" in sentence and f"only {cache_keys.size_text(needed - 1)} is free" in sentence
    assert "SELAGG_CACHE" in sentence and "SELAGG_MAX_IMAGES" in sentence and str(cache) in sentence
    free[0] = cache_keys.pooled_entry_bytes(64, 128, True) - 1
    with pytest.raises(SelaggError, match=f"needs {cache_keys.size_text(free[0] + 1)} "):
        feat.pooled_features("tiny-mae", data, options=QUIET)
    assert list(cache.glob("*.safetensors")) == []


def test_the_disk_space_estimate_covers_the_entry(cache, data, monkeypatch):
    import shutil

    usage = shutil.disk_usage(Path("/"))
    needed = cache_keys.token_entry_bytes(64, 65, 128) * 2
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=needed))  # just enough for two
    sets = feat.cached_blocks("tiny-mae", data, [3, None], options=QUIET)
    sizes = [cache_keys.entry_path(s.key).stat().st_size for s in sets]
    assert all(64 * 65 * 128 * 2 < size <= needed / 2 for size in sizes)


def test_loader_workers_and_their_check(cache, data, model):
    assert extraction.loader_workers(None, "cpu") == 0
    assert extraction.loader_workers(None, "cuda") == min(4, os.cpu_count() or 1)
    with pytest.raises(SelaggError, match="num_workers=-1"):
        feat.cached_tokens("tiny-mae", data, options=ExtractOptions(progress=False, num_workers=-1))
    ts = feat.cached_tokens("tiny-mae", data, options=ExtractOptions(batch_size=16, progress=False, num_workers=1))
    assert torch.equal(ts.tokens, in_memory_extraction(model, data, [None], 16)[0][0])


def test_the_forward_precision_is_part_of_the_key(cache, data, monkeypatch):
    plain = feat.cached_tokens("tiny-mae", data, options=QUIET)
    assert plain.key["compute"] == "float32" == cache_keys.cache_key("tiny-mae", data, "last", True)["compute"]
    monkeypatch.setattr(extraction, "half_dtype", lambda device: torch.bfloat16)  # a device with native bfloat16
    assert extraction.compute_precision("cpu") == "bfloat16 autocast"
    half = feat.cached_tokens("tiny-mae", data, options=QUIET)  # the forward pass runs under autocast
    assert half.key["compute"] == "bfloat16 autocast" and cache_keys.entry_path(half.key) != cache_keys.entry_path(plain.key)
    assert not torch.equal(half.tokens, plain.tokens)
    assert (half.tokens.float() - plain.tokens.float()).abs().mean() < 0.05  # bfloat16 arithmetic, same model
    assert len(list(cache.glob("*.safetensors"))) == 2


# ----------------------------------------------------------------------------- kill -9 in every phase
CHILD = """
import os, sys, time
from pathlib import Path
import torch
from selagg_utils import extraction
from selagg_utils.cache import keys as cache_keys
from selagg_utils.cache import store as token_store
from selagg_utils import features as feat
blob = torch.load(os.environ["DATA"])
data = torch.utils.data.TensorDataset(blob["images"], blob["labels"])
def signal_and_wait(name):
    Path(os.environ["MARKERS"], name).touch()
    time.sleep(600)
"""

STALL_MID_STREAM = """
token_store.UNNAMED_TEMPORARIES = False  # a file system without unnamed files: the entry grows under a temporary name
real, calls = extraction.tokens_after, []
def stalls_on_third_batch(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        signal_and_wait("streaming")
    return real(*args, **kwargs)
extraction.tokens_after = stalls_on_third_batch
feat.cached_tokens("tiny-random", data, options=extraction.ExtractOptions(batch_size=16, progress=False))
"""

STALL_BEFORE_RENAME = """
real_replace = os.replace
def stalls_before_the_final_name(src, dst):
    if str(dst).endswith(".safetensors"):
        signal_and_wait("renaming")
    return real_replace(src, dst)
os.replace = stalls_before_the_final_name
feat.cached_tokens("tiny-random", data, options=extraction.ExtractOptions(batch_size=16, progress=False))
"""


@pytest.fixture(scope="module")
def killed_while_writing(tmp_path_factory):
    """Two processes killed with SIGKILL: one with half its batches in a named temporary file, one whose
    complete entry has its temporary name but not yet its final one."""
    root = tmp_path_factory.mktemp("killed")
    images = cluttered_digits("val", n_images=48)
    blob = root / "images.pt"
    torch.save({"images": images.images, "labels": images.labels}, blob)
    markers = root / "markers"
    markers.mkdir()
    caches = {"streaming": root / "cache-streaming", "renaming": root / "cache-renaming"}
    procs = {}
    for name, code in (("streaming", STALL_MID_STREAM), ("renaming", STALL_BEFORE_RENAME)):
        env = {**os.environ, "SELAGG_CACHE": str(caches[name]), "MARKERS": str(markers), "DATA": str(blob),
               "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        procs[name] = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILD + code)], env=env, cwd=ROOT,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not all((markers / name).exists() for name in procs):
            ended = [p for p in procs.values() if p.poll() is not None]
            assert not ended, ended[0].stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the children did not reach the point of the fault in time"
            time.sleep(0.05)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close(), proc.stderr.close()
    dataset = torch.utils.data.TensorDataset(images.images, images.labels)
    with torch.no_grad():
        expected = load_backbone("tiny-random").forward_features(images.images).half()
    return caches, {name: p.pid for name, p in procs.items()}, dataset, expected


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["streaming", "renaming"])
def test_kill_while_writing_leaves_an_orphan_the_next_run_removes(killed_while_writing, phase, monkeypatch, capsys):
    caches, pids, dataset, expected = killed_while_writing
    cache = caches[phase]
    orphans = list(cache.glob(".*.tmp"))
    assert len(orphans) == 1 and f"-{pids[phase]}." in orphans[0].name and orphans[0].stat().st_size > 0
    assert list(cache.glob("*.safetensors")) == [] and len(list(cache.glob(".*.lock"))) == 1
    start, end = tensor_offsets(orphans[0], "tokens")
    if phase == "streaming":  # two of three batches of 16 images are in it, under a blank checksum
        assert orphans[0].stat().st_size - start == 32 * 65 * 128 * 2 and end - start == 48 * 65 * 128 * 2
        assert b'"checksum":"' + b"0" * 64 + b'"' in orphans[0].read_bytes()[:start]
    else:  # complete, under its final checksum
        assert orphans[0].stat().st_size == end and b"0" * 64 not in orphans[0].read_bytes()[:start]
    monkeypatch.setenv(cache_keys.CACHE_ENV, str(cache))
    got = feat.cached_tokens("tiny-random", dataset, options=QUIET)
    assert torch.equal(got.tokens, expected) and not orphans[0].exists()
    assert [p.name for p in cache.iterdir()] == [cache_keys.entry_path(got.key).name]
    assert capsys.readouterr().err == ""


def test_entries_are_written_and_read_where_the_os_has_no_pread(tmp_path, monkeypatch):
    """Windows has no os.pread/os.pwrite: the seek-and-read fallback must write and read the same entry."""
    import os

    from selagg_utils import data, features

    ds = data.cluttered_digits("val", n_images=40)
    with_p = features.cached_tokens("tiny-random", ds, options=ExtractOptions(batch_size=16, progress=False),
                                    directory=tmp_path / "a")
    monkeypatch.delattr(os, "pread")
    monkeypatch.delattr(os, "pwrite")
    without = features.cached_tokens("tiny-random", ds, options=ExtractOptions(batch_size=16, progress=False),
                                     directory=tmp_path / "b")
    again = features.cached_tokens("tiny-random", ds, options=ExtractOptions(batch_size=16, progress=False),
                                   directory=tmp_path / "b")
    assert torch.equal(with_p.tokens, without.tokens) and torch.equal(without.tokens, again.tokens)
