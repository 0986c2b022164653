"""Probe sweeps trained by two processes (gloo on the CPU) equal one process on the whole split."""
import copy
import functools
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from selagg_utils import SelaggError
from selagg_utils.features import TokenSet
from selagg_utils.models import TokenLayout
from selagg_utils.probing import ProbeRecipe, train_probes
from selagg_utils.scaleout import distributed
from selagg_utils.scaleout.ddp_probing import (
    ProbeProblem,
    bench_probe_epoch,
    local_rows_of_batch,
    train_probes_distributed,
)
from selagg_utils.scaleout.distributed import ProcessInfo, current_process, process_group

ROOT = Path(__file__).resolve().parents[1]
D, C, T = 16, 3, 17
RECIPE = ProbeRecipe(epochs=5, warmup_epochs=1, batch_size=16, lrs=(0.1, 1.0, 10.0), optimizer="adamw")
SEEDS = (0, 1)


def toy(n: int, seed: int, shift: torch.Tensor | None = None) -> TokenSet:
    """Tokens whose class is written into one of 16 patches, with a flag an attention head can find; [cls] weakly."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % C
    x = torch.randn(n, T, D, generator=g) * 0.5
    where = torch.randint(1, T, (n,), generator=g)
    x[torch.arange(n), where, :C] += 3 * torch.nn.functional.one_hot(labels, C).float()
    x[torch.arange(n), where, C] += 3.0
    x[:, 0, :C] += 0.5 * torch.nn.functional.one_hot(labels, C).float()
    if shift is not None:  # images of another distribution: every token moved far along every width
        x[shift] += 4.0
    return TokenSet(x.half(), labels, TokenLayout(True, 0, (4, 4)), {"toy": seed})


def shard_parts(n: int, shard_size: int, world: int) -> list[torch.Tensor]:
    """Global indices of each part when shard i of `shard_size` images goes to part i % world (as in a token store)."""
    shard = torch.arange(n) // shard_size
    return [torch.nonzero(shard % world == r).flatten() for r in range(world)]


# The cases both processes run: head, the split's data, and each rank's part of train / val / test.
SHIFTED = torch.arange(60) % 2 == 1  # odd images come from another distribution, and rank 1 holds them all
CASES = {
    "cls": ("cls", None, shard_parts(60, 7, 2), shard_parts(30, 8, 2)),
    "mean": ("mean", None, shard_parts(60, 7, 2), shard_parts(30, 8, 2)),
    "abmilp": ("abmilp", None, shard_parts(60, 7, 2), shard_parts(30, 8, 2)),
    "uneven": ("abmilp", None, [torch.arange(60)[torch.arange(60) % 9 != 4], torch.arange(4, 60, 9)],
               [torch.arange(27), torch.arange(27, 30)]),
    "shifted": ("mean", SHIFTED, [torch.nonzero(~SHIFTED).flatten(), torch.nonzero(SHIFTED).flatten()],
                shard_parts(30, 8, 2)),
}


def splits(shift: torch.Tensor | None) -> tuple[TokenSet, TokenSet, TokenSet]:
    return toy(60, 0, shift), toy(30, 1, None if shift is None else shift[:30]), toy(30, 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, out: str) -> None:
    """One process: every case on its parts, plus one with a NaN token on rank 1 only; results saved per rank."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    saved = {"process": current_process()}
    try:
        for name, (head, shift, train_parts, eval_parts) in CASES.items():
            train, val, test = splits(shift)
            mine = train_parts[rank]
            results = train_probes_distributed(head, train.subset(mine), val.subset(eval_parts[rank]),
                                               test.subset(eval_parts[1 - rank]), RECIPE, SEEDS,
                                               train_indices=mine)
            saved[name] = [(r.best_lr, r.val_by_lr, r.test, r.head.state_dict(), r.losses) for r in results]
        train, val, _ = splits(None)
        part = train.subset(torch.arange(rank, 60, 2))
        if rank == 1:
            part.tokens[3, 5, 0] = float("nan")
        try:
            train_probes_distributed("abmilp", part, val, None, RECIPE, (0,), train_indices=torch.arange(rank, 60, 2))
            saved["nan"] = None
        except SelaggError as err:
            saved["nan"] = str(err)
    finally:
        torch.save(saved, Path(out) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> list[dict]:
    """What each of two processes returned for every case (both spawned once for the whole file)."""
    out = tmp_path_factory.mktemp("ddp")
    # forked, the processes start with this one's imports (spawned, each would import torch and timm again);
    # they compute on one thread and no GPU, so nothing this process started is needed in them
    processes = mp.start_processes(worker, args=(2, free_port(), str(out)), nprocs=2, join=False,
                                   start_method="fork")
    deadline = time.monotonic() + 300
    while not processes.join(timeout=5):  # a process that waits forever on the other fails the test instead
        if time.monotonic() > deadline:
            for p in processes.processes:
                p.kill()
            pytest.fail("The two training processes did not finish within 300 s.")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@functools.lru_cache(maxsize=None)
def one_process(name: str):
    head, shift, _, _ = CASES[name]
    train, val, test = splits(shift)
    return train_probes(head, train, val, test, RECIPE, SEEDS)


def assert_equal_to_one_process(two_processes, name: str) -> None:
    ref = one_process(name)
    for rank in range(2):
        for r, (best_lr, val_by_lr, test, state, losses) in zip(ref, two_processes[rank][name]):
            assert best_lr == r.best_lr
            assert val_by_lr == pytest.approx(r.val_by_lr, abs=1e-6)  # counts / 30: equal counts
            assert test == r.test
            assert_same_head(state, r.head, splits(CASES[name][1])[1])
            assert losses == pytest.approx(r.losses, abs=1e-5)
    for a, b in zip(two_processes[0][name], two_processes[1][name]):  # the same result on both processes
        assert a[:3] == b[:3] and all(torch.equal(b[3][k], v) for k, v in a[3].items())


def assert_same_head(state: dict, head, val: TokenSet) -> None:
    """Weights close (but AbMILP's score bias: a softmax ignores it, so rounding noise alone moves it); logits close."""
    for key, value in head.state_dict().items():
        if not key.endswith("score.bias"):
            torch.testing.assert_close(state[key], value, atol=2e-5, rtol=1e-4, msg=f"{key} differs")
    other = copy.deepcopy(head).eval()
    other.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(other(val.tokens.float()), head.eval()(val.tokens.float()), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["cls", "mean", "abmilp"])
def test_two_processes_equal_one_process_on_the_whole_split(two_processes, name):
    assert_equal_to_one_process(two_processes, name)
    if name == "abmilp":  # the data can be learnt, so the equality is not one of untrained heads
        assert max(r.val for r in one_process(name)) > 0.8


def test_parts_of_very_different_sizes_equal_one_process(two_processes):
    sizes = [len(p) for p in CASES["uneven"][2]]
    assert sizes == [53, 7]  # some global batches hold no image of rank 1
    assert_equal_to_one_process(two_processes, "uneven")


def test_batch_norm_normalises_with_the_statistics_of_the_global_batch(two_processes):
    train, _, _ = splits(SHIFTED)
    pooled = train.mean_patches
    gap = (pooled[SHIFTED].mean(0) - pooled[~SHIFTED].mean(0)).abs().min()
    assert gap > 3.0  # each rank's own statistics would be far from the global batch's
    assert_equal_to_one_process(two_processes, "shifted")


def test_each_process_trains_as_its_place_in_the_initialised_group(two_processes):
    assert [p["process"] for p in two_processes] == [ProcessInfo(r, 2, torch.device("cpu")) for r in range(2)]


def test_current_process_inside_process_group_alone_is_what_it_gave(monkeypatch):
    """Without torchrun, process_group's one process computes on its device (a GPU under NCCL) and so does a sweep."""
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_device_for", lambda backend, local: torch.device("meta"))
    with process_group("gloo") as info:
        assert info.device == torch.device("meta") and current_process() == info
    assert current_process() == ProcessInfo(0, 1, torch.device("cpu"))


def test_a_nan_token_in_one_part_stops_every_process_with_a_sentence(two_processes):
    assert two_processes[0]["nan"] == two_processes[1]["nan"]
    assert two_processes[0]["nan"].startswith("Process 1 of 2: The train tokens of image 3 contain NaN")


# ----------------------------------------------------------------------------- one process, no process group
def test_a_shuffled_part_with_its_global_indices_equals_the_whole_split():
    train, val, test = splits(None)
    order = torch.randperm(60, generator=torch.Generator().manual_seed(1))
    got = train_probes_distributed("abmilp", train.subset(order), val, test, RECIPE, SEEDS, train_indices=order)
    for a, b in zip(got, train_probes("abmilp", train, val, test, RECIPE, SEEDS)):
        assert (a.best_lr, a.test) == (b.best_lr, b.test) and a.val_by_lr == pytest.approx(b.val_by_lr, abs=1e-6)
        assert_same_head(a.head.state_dict(), b.head, val)


def test_indices_that_repeat_an_image_or_do_not_fit_are_refused():
    train, val, _ = splits(None)
    with pytest.raises(SelaggError, match="global image 0 3 times"):
        train_probes_distributed("mean", train, val, recipe=RECIPE, train_indices=torch.arange(60).clamp(min=2) - 2)
    with pytest.raises(SelaggError, match="outside 0..59"):
        train_probes_distributed("mean", train, val, recipe=RECIPE, train_indices=torch.arange(60) + 1)
    with pytest.raises(SelaggError, match="one global index per image"):
        train_probes_distributed("mean", train, val, recipe=RECIPE, train_indices=torch.arange(59))


def test_a_part_without_images_of_a_batch_reads_only_padding():
    local_row = torch.tensor([-1, 0, -1, 1, -1, -1])
    rows, weight = local_rows_of_batch(local_row, torch.tensor([[3, 0, 1], [0, 2, 4]]))
    assert rows.tolist() == [[1, 0], [0, 0]] and weight.tolist() == [[1, 1], [0, 0]]


def test_bench_probe_epoch_gives_seconds_per_gigabyte():
    row = bench_probe_epoch("mean", ProbeProblem(images=32, num_tokens=17, dim=8), lrs=2, batch_size=8, epochs=1)
    assert row["processes"] == 1 and row["train_gb"] == pytest.approx(32 * 17 * 8 * 2 / 1e9)
    assert (row["images"], row["num_tokens"], row["dim"], row["batch_size"]) == (32, 17, 8, 8)
    assert row["seconds_per_epoch_per_gb"] == pytest.approx(row["seconds_per_epoch"] / row["train_gb"])
    with pytest.raises(SelaggError, match="ProbeProblem"):
        bench_probe_epoch("mean", 32)


@pytest.mark.parametrize("bad, words", [(dict(num_tokens=20), "not 1 + a square"), (dict(num_tokens=1), "num_tokens=1"),
                                        (dict(images=1), "images=1"), (dict(dim=8.0), "dim=8.0"),
                                        (dict(classes=0), "classes=0")])
def test_probe_problems_that_cannot_be_timed_are_refused(bad, words):
    with pytest.raises(SelaggError, match=words.replace("+", r"\+")):
        ProbeProblem(**bad)
    assert ProbeProblem(num_tokens=50).side == 7


# ----------------------------------------------------------------------------- the script
def load_script():
    spec = importlib.util.spec_from_file_location("train_probes_script", ROOT / "scripts" / "train_probes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_writes_what_one_process_trains(tmp_path, monkeypatch, capsys):
    script = load_script()
    train, val, test = splits(None)
    order = torch.randperm(60, generator=torch.Generator().manual_seed(2))
    stores = {"train": (train.subset(order), order), "val": (val, torch.arange(30)), "test": (test, torch.arange(30))}
    monkeypatch.setattr(script, "load_part", lambda path, info: stores[Path(path).name])
    out = tmp_path / "results.json"
    script.main(["--train", "train", "--val", "val", "--test", "test", "--head", "abmilp", "--epochs", "5",
                 "--warmup-epochs", "1", "--batch-size", "16", "--lrs", "0.1", "1", "10", "--optimizer", "adamw",
                 "--seeds", "0", "1",
                 "--out", str(out)])
    row = json.loads(out.read_text())
    ref = train_probes("abmilp", train, val, test, RECIPE, SEEDS)
    assert [s["best_lr"] for s in row["seeds"]] == [r.best_lr for r in ref]
    assert [s["test"] for s in row["seeds"]] == [r.test for r in ref]
    assert row["train_bytes"] == 60 * T * D * 2 and row["processes"] == 1 and row["epochs"] == 5
    assert capsys.readouterr().out.startswith("abmilp: lr ")


@pytest.mark.slow
def test_the_script_under_torchrun_reads_token_stores(tmp_path):
    """Two processes on stores of 4 shards each (rank 1 holding fewer images) write what one process trains."""
    if not (ROOT / "selagg_utils" / "shards.py").exists():  # not an installed copy found elsewhere
        pytest.skip("the token store (selagg_utils/shards.py) is not in this tree")
    from selagg_utils.data import load_dataset
    from selagg_utils.scaleout import shards

    stores = {}
    for split, n in (("train", 60), ("val", 30)):
        stores[split] = shards.extract_to_store("tiny-random", load_dataset("cluttered-digits", split, n_images=n),
                                                tmp_path / split, store=shards.StoreOptions(16 if split == "train" else 8))
    out = tmp_path / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "scripts" / "train_probes.py"), "--train", str(tmp_path / "train"), "--val",
                           str(tmp_path / "val"), "--head", "abmilp", "--epochs", "5", "--warmup-epochs", "1",
                           "--batch-size", "16", "--lrs", "0.1", "1", "10", "--optimizer", "adamw", "--out", str(out),
                           "--backend", "gloo"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(out.read_text())
    ref = train_probes("abmilp", stores["train"].token_set(), stores["val"].token_set(), None, RECIPE, (0,))[0]
    assert row["seeds"][0]["best_lr"] == ref.best_lr and row["processes"] == 2
    assert row["seeds"][0]["val_by_lr"] == pytest.approx(ref.val_by_lr, abs=1e-6)
    assert done.stdout.count("abmilp: lr ") == 1  # one summary line, from rank 0
