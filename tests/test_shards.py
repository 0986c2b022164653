"""The sharded token store: extraction by several processes (torchrun, gloo), resuming, parts, int8, bad input."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selagg_utils.checks import SelaggError
from selagg_utils.data import load_dataset
from selagg_utils.extraction import ExtractOptions, extract_blocks
from selagg_utils.models import load_backbone
from selagg_utils.scaleout.distributed import check_backend, process_group
from selagg_utils.scaleout.shard_files import (
    StoreOptions,
    dequantized,
    quantized,
    shard_name,
    sidecar_name,
    store_identity,
)
from selagg_utils.scaleout.shards import TokenStore, extract_to_store

pytestmark = pytest.mark.slow  # processes, scripts or builds: `make test` runs them, `make check` not

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES, SHARD, BACKBONE = 40, 8, "tiny-mae"  # five shards of eight images
STORE = StoreOptions(shard_size=SHARD)
QUIET, QUIET8 = ExtractOptions(progress=False), ExtractOptions(batch_size=8, progress=False)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

KILLED_RANK = """
import os, signal, sys
from selagg_utils.scaleout import shards
from selagg_utils.data import load_dataset
from selagg_utils.scaleout.distributed import process_group
from selagg_utils.extraction import ExtractOptions

with process_group("gloo") as info:
    write_shard = shards.write_shard

    def write_then_die(*args, **kwargs):  # rank 1 is killed (SIGKILL) right after writing its first shard
        sidecar = write_shard(*args, **kwargs)
        if info.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return sidecar

    shards.write_shard = write_then_die
    data = load_dataset("cluttered-digits", "train", n_images=int(sys.argv[2]))
    shards.extract_to_store("tiny-mae", data, sys.argv[1], store=shards.StoreOptions(shard_size=int(sys.argv[3])),
                            options=ExtractOptions(batch_size=8, progress=False))
"""


def env() -> dict:
    """The environment of a child process: this checkout first on the path, one thread, offline."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TQDM_DISABLE": "1"}


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every shard file with a sidecar: a file written again gets a new inode."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.glob("shard-*.safetensors"))
            if (folder / p.name.replace(".safetensors", ".json")).is_file()}


@pytest.fixture(scope="module")
def data():
    return load_dataset("cluttered-digits", "train", n_images=N_IMAGES)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The store written by one process, on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield extract_to_store(BACKBONE, data, tmp_path_factory.mktemp("one") / "store", store=STORE,
                               options=QUIET8)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def two_process_store(tmp_path_factory):
    """The store written by `torchrun --nproc_per_node=2 scripts/extract_tokens.py` (gloo), and its output."""
    out = tmp_path_factory.mktemp("two") / "store"
    run = subprocess.run([*TORCHRUN, str(ROOT / "scripts" / "extract_tokens.py"), "--backbone", BACKBONE,
                          "--dataset", "cluttered-digits", "--split", "train", "--out", str(out), "--max-images",
                          str(N_IMAGES), "--shard-size", str(SHARD), "--batch-size", "8", "--backend", "gloo"],
                         env=env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return TokenStore(out), run.stdout


@pytest.fixture
def copy(reference, tmp_path):
    """A copy of the reference store to damage."""
    return Path(shutil.copytree(reference.path, tmp_path / "store"))


def test_one_process_store_equals_the_package_extraction_and_the_layout(reference, data):
    whole = reference.token_set()
    tokens, labels = extract_blocks(load_backbone(BACKBONE), data, [None], QUIET8)
    assert torch.equal(whole.tokens, tokens[0]) and torch.equal(whole.labels, labels)
    assert len(reference) == N_IMAGES and len(reference.shards) == 5 and reference.shards[-1]["stop"] == N_IMAGES
    assert (whole.num_prefix_tokens, whole.has_cls, whole.grid_size) == (1, True, (8, 8))
    assert reference.identity["block"] == "last" and reference.identity["split"] == "train"


def test_two_processes_write_the_same_store_bit_for_bit(two_process_store, reference):
    store, stdout = two_process_store
    mine, theirs = store.token_set(), reference.token_set()
    assert torch.equal(mine.tokens, theirs.tokens) and torch.equal(mine.labels, theirs.labels)
    assert [s["sha256"] for s in store.shards] == [s["sha256"] for s in reference.shards]
    lines = [line for line in stdout.splitlines() if line.startswith("extract_tokens:")]
    assert len(lines) == 1 and f"{N_IMAGES} images in the store, {N_IMAGES} extracted now by 2 processes" in lines[0]


@pytest.mark.parametrize("parts", [1, 3])
def test_parts_of_a_two_process_store_put_back_together_give_the_whole(two_process_store, reference, parts):
    store, _ = two_process_store
    whole = reference.token_set()
    tokens = torch.full_like(whole.tokens, float("nan"))
    labels = torch.full_like(whole.labels, -1)
    seen = []
    for part in range(parts):
        piece, index = store.token_set(part, parts), store.part_indices(part, parts)
        assert len(piece) == len(index) and piece.grid_size == whole.grid_size
        tokens[index], labels[index] = piece.tokens, piece.labels
        seen.append(index)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(N_IMAGES))  # disjoint and complete
    assert torch.equal(tokens, whole.tokens) and torch.equal(labels, whole.labels)
    if parts == 3:  # shard i goes to part i % 3: part 1 holds shards 1 and 4
        assert store.part_indices(1, 3).tolist() == list(range(8, 16)) + list(range(32, 40))


def test_a_killed_rank_then_a_resumed_run_keeps_the_finished_shards(tmp_path, data, reference, one_thread):
    out = tmp_path / "store"
    helper = tmp_path / "killed_rank.py"
    helper.write_text(KILLED_RANK)
    run = subprocess.run([*TORCHRUN, str(helper), str(out), str(N_IMAGES), str(SHARD)], env=env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert not (out / "index.json").exists()
    before = stamps(out)
    assert shard_name(1) in before and shard_name(3) not in before  # rank 1 wrote shard 1, then died
    store = extract_to_store(BACKBONE, data, out, store=STORE, options=QUIET8)
    assert set(store.extracted) == {i for i in range(5) if shard_name(i) not in before}
    after = stamps(out)
    assert {name: after[name] for name in before} == before  # finished shards were not written again
    assert torch.equal(store.token_set().tokens, reference.token_set().tokens)
    assert not list(out.glob(".*.tmp"))
    again = extract_to_store(BACKBONE, data, out, store=STORE, options=QUIET8)
    assert again.extracted == () and stamps(out) == after


def test_int8_tokens_take_about_half_the_bytes_within_half_a_step(tmp_path, data, reference, one_thread):
    store = extract_to_store(BACKBONE, data, tmp_path / "int8", store=StoreOptions(SHARD, "int8"), options=QUIET8)
    x = reference.token_set().tokens.float()
    y = store.token_set().tokens.float()
    step = x.abs().amax(-1, keepdim=True) / 127
    assert torch.all((x - y).abs() <= step / 2 * 1.01 + x.abs() * 2 ** -10)
    assert (x - y).abs().max() > 0  # the tokens really went through 8 bits
    assert 0.45 < store.nbytes() / reference.nbytes() < 0.6
    assert store.identity["dtype"] == "int8"


def test_quantisation_of_zero_and_extreme_tokens():
    tokens = torch.tensor([[[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [65504.0, -65504.0, 1.0]]]).half()
    q, scale = quantized(tokens)
    back = dequantized(q, scale)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (1, 3)
    assert torch.equal(back[0, 0], torch.zeros(3, dtype=torch.float16)) and torch.isfinite(back).all()
    assert q[0, 1].tolist() == [64, -127, 32] and back[0, 2, :2].tolist() == [65504.0, -65504.0]


def test_a_missing_shard_is_named(copy):
    (copy / shard_name(2)).unlink()
    with pytest.raises(SelaggError, match=r"lacks shard-00002.safetensors \(images 16 to 24\)"):
        TokenStore(copy)


@pytest.mark.parametrize("change, message", [
    (lambda index: index["shards"][1].update(start=9), r"shard 1 is listed with images 9 to 16"),
    (lambda index: index["shards"].pop(), r"lists 4 shards where 40 images in shards of 8 need 5"),
    (lambda index: index.update(n_images=48), r"lists 5 shards where 48 images"),
    (lambda index: index["shards"][0].update(sha256="0" * 64), r"checksum of shard-00000.safetensors differs"),
    (lambda index: index.update(width=64), r"does not hold 8 images of float16 tokens of shape \(65, 64\)"),
])
def test_an_index_that_does_not_match_its_shards_is_refused(copy, change, message):
    index = json.loads((copy / "index.json").read_text())
    change(index)
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(SelaggError, match=message):
        TokenStore(copy)


def test_a_shard_in_the_place_of_another_is_refused(copy):
    shutil.copyfile(copy / shard_name(0), copy / shard_name(1))
    shutil.copyfile(copy / sidecar_name(0), copy / sidecar_name(1))
    with pytest.raises(SelaggError, match=r"shard-00001.safetensors holds images 0 to 8, the index lists 8 to 16"):
        TokenStore(copy)


def test_a_truncated_shard_is_named(copy):
    path = copy / shard_name(4)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SelaggError, match=r"shard-00004.safetensors has \d+ bytes, the index says"):
        TokenStore(copy)


def test_a_changed_shard_fails_its_checksum_when_read(copy):
    path = copy / shard_name(3)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x40  # one bit of a token
    path.write_bytes(bytes(raw))
    store = TokenStore(copy)  # same size, same header: found by the checksum
    with pytest.raises(SelaggError, match=r"shard-00003.safetensors does not match its checksum"):
        store.token_set()
    with pytest.raises(SelaggError, match="does not match its checksum"):
        store.verify()
    assert len(store.token_set(1, 3)) == 16  # a part without shard 3 (shards 1 and 4) still reads


@pytest.mark.parametrize("request_, message", [
    (dict(backbone="tiny-jea"), r"backbone 'tiny-mae' where 'tiny-jea' was asked for"),
    (dict(seed=1), r"another dataset"),
    (dict(dtype="int8"), r"dtype 'float16' where 'int8' was asked for"),
    (dict(block=2), r"block 'last' where 2 was asked for"),
])
def test_resuming_into_a_store_of_another_request_is_refused_before_any_work(copy, request_, message):
    before = stamps(copy)
    data = load_dataset("cluttered-digits", "train", n_images=N_IMAGES, seed=request_.pop("seed", 0))
    store = StoreOptions(SHARD, request_.pop("dtype", "float16"))
    with pytest.raises(SelaggError, match=message):
        extract_to_store(request_.pop("backbone", BACKBONE), data, copy, store=store, options=QUIET, **request_)
    assert stamps(copy) == before


def test_resuming_with_another_shard_size_is_refused(copy, data):
    with pytest.raises(SelaggError, match=r"has shards of 8 images, not 16; pass shard_size=8"):
        extract_to_store(BACKBONE, data, copy, store=StoreOptions(shard_size=16), options=QUIET)
    (copy / "index.json").unlink()  # a killed run leaves sidecars only
    with pytest.raises(SelaggError, match=r"covers images 0 to 8, which shards of 16 images do not"):
        extract_to_store(BACKBONE, data, copy, store=StoreOptions(shard_size=16), options=QUIET)


def test_a_store_read_as_another_block_or_backbone_is_refused(reference, data):
    with pytest.raises(SelaggError, match=r"block 'last' where 2 was asked for"):
        TokenStore(reference.path, expect={"block": 2})
    with pytest.raises(SelaggError, match=r"backbone 'tiny-mae' where 'tiny-jea' was asked for"):
        TokenStore(reference.path, expect=store_identity("tiny-jea", data))
    assert len(TokenStore(reference.path, expect=store_identity(BACKBONE, data))) == N_IMAGES
    assert len(TokenStore(reference.path, expect={"block": None})) == N_IMAGES


def test_the_identity_takes_norm_and_device_from_the_options_and_dtype_and_split_from_the_store(data):
    plain = store_identity(BACKBONE, data)  # device None: this process's, the CPU outside torchrun
    assert plain == store_identity(BACKBONE, data, options=ExtractOptions(device="cpu"))
    assert (plain["block"], plain["norm"], plain["dtype"], plain["split"]) == ("last", True, "float16", "train")
    other = store_identity(BACKBONE, data, block=3, store=StoreOptions(dtype="int8", split="val"),
                           options=ExtractOptions(norm=False))
    assert (other["block"], other["norm"], other["dtype"], other["split"]) == (3, False, "int8", "val")
    assert store_identity(BACKBONE, data, options=ExtractOptions(norm=False)) == plain  # the last block is normed


def test_not_a_store_and_bad_arguments_are_refused(tmp_path, reference, data):
    with pytest.raises(SelaggError, match="holds no readable index.json"):
        TokenStore(tmp_path)
    with pytest.raises(SelaggError, match=r"dtype='int4' is not a stored token type"):
        StoreOptions(dtype="int4")
    with pytest.raises(SelaggError, match=r"shard_size=0 is not accepted"):
        StoreOptions(shard_size=0)
    with pytest.raises(SelaggError, match=r"split=3 is not a split name"):
        StoreOptions(split=3)
    with pytest.raises(SelaggError, match=r"store must be an instance of shard_files.StoreOptions, not dict"):
        extract_to_store(BACKBONE, data, tmp_path / "x", store={"shard_size": 8})
    with pytest.raises(SelaggError, match=r"A token store keeps float16 tokens, so options.dtype=torch.float32"):
        extract_to_store(BACKBONE, data, tmp_path / "x", options=ExtractOptions(dtype=torch.float32))
    assert not (tmp_path / "x").exists()  # refused before any work
    with pytest.raises(SelaggError, match=r"part=3 is not accepted with parts=3"):
        reference.token_set(3, 3)
    (tmp_path / "file").write_text("")
    with pytest.raises(SelaggError, match="is a file, not a folder"):
        extract_to_store(BACKBONE, data, tmp_path / "file")
    if sys.platform.startswith("linux"):  # /proc takes no new folders, even from root
        with pytest.raises(SelaggError, match="cannot be written"):
            extract_to_store(BACKBONE, data, "/proc/selagg-store")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU, so NCCL is not missing")
def test_nccl_without_a_gpu_is_one_sentence(monkeypatch):
    with pytest.raises(SelaggError, match="NCCL needs CUDA GPUs and this machine has none; start with --backend gloo"):
        check_backend("nccl")
    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29999").items():
        monkeypatch.setenv(name, value)  # as torchrun sets them
    with pytest.raises(SelaggError, match="NCCL needs CUDA GPUs"):
        with process_group("nccl"):
            pass
    assert not torch.distributed.is_initialized()
    with pytest.raises(SelaggError, match="not one the package uses"):
        check_backend("mpi")
    assert check_backend(None) == "gloo"
