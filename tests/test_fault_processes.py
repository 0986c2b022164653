"""Real faults in real processes: kill -9 in the middle of an extraction and of a write, three processes
filling one cache entry at once (one extracts, the others wait for its entry), bit-identical probes
from fresh processes, and an entry another user wrote that this one may not read."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from selagg_utils import features as feat
from selagg_utils.cache import entries as cache_entries
from selagg_utils.cache import keys as cache_keys
from selagg_utils.data import load_dataset
from selagg_utils.extraction import ExtractOptions
from selagg_utils.models import load_backbone

pytestmark = pytest.mark.slow  # processes, scripts or builds: `make test` runs them, `make check` not

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 48
QUIET = ExtractOptions(progress=False)

PREAMBLE = """
import os, sys, time, hashlib
from pathlib import Path
import torch
from selagg_utils import extraction
from selagg_utils import features as feat
from selagg_utils.cache import entries as cache_entries
blob = torch.load(os.environ["DATA"])  # the parent's images: no dataset to render in every child
data = torch.utils.data.TensorDataset(blob["images"], blob["labels"])
def signal_and_wait(name):
    Path(os.environ["MARKERS"], name).touch()
    time.sleep(600)
"""

STALL_IN_EXTRACTION = """
real = extraction.tokens_after
calls = []
def stalls_on_second_batch(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        signal_and_wait("extracting")
    return real(*args, **kwargs)
extraction.tokens_after = stalls_on_second_batch
feat.cached_tokens("tiny-random", data, options=extraction.ExtractOptions(batch_size=16, progress=False))
"""

STALL_IN_WRITE = """
real_replace = os.replace
def stall_before_the_final_name(src, dst):  # the entry is written, under its temporary name
    if str(dst).endswith(".safetensors"):
        signal_and_wait("writing")
    return real_replace(src, dst)
os.replace = stall_before_the_final_name
feat.cached_tokens("tiny-random", data, options=extraction.ExtractOptions(batch_size=16, progress=False))
"""

WRITER = """
real_extract, extractions = extraction.extract_blocks, []
def counted(*args, **kwargs):
    extractions.append(1)
    return real_extract(*args, **kwargs)
cache_entries.extract_blocks = counted
Path(os.environ["MARKERS"], f"ready-{os.getpid()}").touch()
while not Path(os.environ["MARKERS"], "go").exists():
    time.sleep(0.01)
tokens = feat.cached_tokens("tiny-random", data, options=extraction.ExtractOptions(batch_size=16, progress=False))
print(hashlib.sha256(tokens.tokens.numpy().tobytes()).hexdigest(), len(extractions))
"""

PROBE = """
from selagg_utils.features import TokenSet
from selagg_utils.models import TokenLayout
from selagg_utils.probing import ProbeRecipe, train_probes
g = torch.Generator().manual_seed(0)
labels = torch.arange(96) % 3
x = torch.randn(96, 10, 16, generator=g)
x[torch.arange(96), 1 + labels * 3, :3] += 3 * torch.nn.functional.one_hot(labels, 3)
train = TokenSet(x[:64].half(), labels[:64], TokenLayout(True, 0, (3, 3)))
val = TokenSet(x[64:].half(), labels[64:], TokenLayout(True, 0, (3, 3)))
recipe = ProbeRecipe(epochs=3, warmup_epochs=1, batch_size=16, optimizer="adamw", lrs=(0.01, 0.1))
digest = hashlib.sha256()
for head in ("abmilp", "mean"):
    for r in train_probes(head, train, val, recipe=recipe, seeds=(0, 1)):
        digest.update(repr((r.val_by_lr, r.best_lr, r.losses)).encode())
        for name, t in sorted(r.head.state_dict().items()):
            digest.update(name.encode() + t.numpy().tobytes())
print(torch.get_num_threads(), digest.hexdigest())
"""


def start(code: str, cache: Path, markers: Path, images: Path) -> subprocess.Popen:
    """A fresh Python process running the preamble and `code`, with its own cache folder and the saved images."""
    env = {**os.environ, "SELAGG_CACHE": str(cache), "MARKERS": str(markers), "DATA": str(images),
           "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}  # several children share the cores
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(PREAMBLE + code)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(paths: list[Path], processes: list[subprocess.Popen], timeout: float = 240.0) -> None:
    """Wait until every marker exists (failing early if a process died first)."""
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        for proc in processes:
            if proc.poll() is not None:
                pytest.fail(f"a child process ended early: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail("the child processes did not reach the point of the fault in time")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def expected(tmp_path_factory):
    """The images every child reads (saved once), as a dataset and a file, and the tokens the cache must return."""
    images = load_dataset("cluttered-digits", "val", n_images=N_IMAGES, seed=0)
    path = tmp_path_factory.mktemp("data") / "images.pt"
    torch.save({"images": images.images, "labels": images.labels}, path)
    data = torch.utils.data.TensorDataset(images.images, images.labels)
    with torch.no_grad():
        return data, load_backbone("tiny-random").forward_features(images.images).half(), path


@pytest.fixture(scope="module")
def killed(tmp_path_factory, expected):
    """Two processes killed with SIGKILL, one in the middle of an extraction, one in the middle of its write."""
    root = tmp_path_factory.mktemp("killed")
    markers = root / "markers"
    markers.mkdir()
    caches = {"extracting": root / "cache-extracting", "writing": root / "cache-writing"}
    images = expected[2]
    procs = {"extracting": start(STALL_IN_EXTRACTION, caches["extracting"], markers, images),
             "writing": start(STALL_IN_WRITE, caches["writing"], markers, images)}
    try:
        wait_for([markers / name for name in procs], list(procs.values()))
    finally:  # the fault itself, and the cleanup should the wait fail
        for proc in procs.values():
            if proc.poll() is None:  # still running (a child that ended early is already reaped)
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()  # reaped: its process id is free again
            proc.stdout.close(), proc.stderr.close()
    return caches, {name: proc.pid for name, proc in procs.items()}


def test_kill_in_the_middle_of_extraction_leaves_nothing_and_the_next_run_is_right(killed, expected, monkeypatch):
    caches, _ = killed
    cache = caches["extracting"]
    assert [p.suffix for p in cache.iterdir()] == [".lock"]  # the dead process's lock; no temporary file
    monkeypatch.setenv(cache_keys.CACHE_ENV, str(cache))
    data, tokens, _ = expected
    got = feat.cached_tokens("tiny-random", data, options=QUIET)  # the kernel released the lock
    assert torch.equal(got.tokens, tokens)
    assert [p.name for p in cache.iterdir()] == [cache_keys.entry_path(got.key).name]


def test_kill_in_the_middle_of_the_write_leaves_an_orphan_the_next_run_removes(killed, expected, monkeypatch,
                                                                               capsys):
    caches, pids = killed
    cache = caches["writing"]
    orphans = list(cache.glob(".*.tmp"))
    assert len(orphans) == 1 and f"-{pids['writing']}." in orphans[0].name and orphans[0].stat().st_size > 0
    assert list(cache.glob("*.safetensors")) == []  # nothing a run could load
    assert len(list(cache.glob(".*.lock"))) == 1
    monkeypatch.setenv(cache_keys.CACHE_ENV, str(cache))
    data, tokens, _ = expected
    got = feat.cached_tokens("tiny-random", data, options=QUIET)
    assert torch.equal(got.tokens, tokens) and not orphans[0].exists()
    assert [p.name for p in cache.iterdir()] == [cache_keys.entry_path(got.key).name]
    assert torch.equal(feat.cached_tokens("tiny-random", data, options=QUIET).tokens, tokens)
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def three_writers(tmp_path_factory, expected):
    """Three fresh processes released at once to fill one cache entry, each then training the same probes."""
    root = tmp_path_factory.mktemp("writers")
    markers, cache = root / "markers", root / "cache"
    markers.mkdir()
    procs = [start(WRITER + PROBE, cache, markers, expected[2]) for _ in range(3)]
    try:
        wait_for([markers / f"ready-{p.pid}" for p in procs], procs)
        (markers / "go").touch()
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    return cache, [out.split() for out, _ in outputs]


def test_three_processes_filling_one_entry_at_once(three_writers, expected, monkeypatch):
    cache, outputs = three_writers
    data, tokens, _ = expected
    assert len({out[0] for out in outputs}) == 1  # every writer got the same tokens
    assert sorted(int(out[1]) for out in outputs) == [0, 0, 1]  # one extracted, two waited and loaded
    monkeypatch.setenv(cache_keys.CACHE_ENV, str(cache))
    monkeypatch.setattr(cache_entries, "extract_blocks", lambda *a, **k: pytest.fail("the entry was not usable"))
    got = feat.cached_tokens("tiny-random", data, options=QUIET)
    assert torch.equal(got.tokens, tokens)
    assert [p.name for p in cache.iterdir()] == [cache_keys.entry_path(got.key).name]  # no temporary file left


def test_the_same_seed_gives_bit_identical_probes_in_fresh_processes(three_writers):
    _, outputs = three_writers
    probes = {tuple(out[2:]) for out in outputs}  # (thread count, digest of accuracies, losses and weights)
    assert len(probes) == 1 and len(next(iter(probes))[1]) == 64


def test_an_entry_another_user_cannot_read_is_not_called_damaged():
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="selagg-shared-"))  # under /tmp: every user can reach it
    os.chmod(folder, 0o777)
    # everything is read first; then, when started as root (who reads any file), the process becomes another user
    code = ("import os, sys; from selagg_utils.data import cluttered_digits as c; "
            "from selagg_utils.features import cached_tokens as t; from selagg_utils.extraction import ExtractOptions "
            "as o; from selagg_utils.models import load_backbone as b; m, d = b('tiny-mae'), c('val', n_images=4); "
            "t('tiny-mae', d, options=o(batch_size=4, progress=False), directory=sys.argv[1], model=m) if sys.argv[2] "
            "== 'first' else None; os.geteuid() == 0 and sys.argv[2] == 'other' and (os.setgid(65534), "
            "os.setuid(65534)); t('tiny-mae', d, options=o(batch_size=4, progress=False), directory=sys.argv[1], "
            "model=m)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    first = subprocess.run([sys.executable, "-c", code, str(folder), "first"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    (entry,) = folder.glob("*.safetensors")
    os.chmod(entry, 0o600 if os.geteuid() == 0 else 0)  # owner only, as entries were written before
    second = subprocess.run([sys.executable, "-c", code, str(folder), "other"], env=env, capture_output=True,
                            text=True, timeout=120)
    shutil.rmtree(folder, ignore_errors=True)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "cannot be read by this user" in second.stderr and "damaged" not in second.stderr
