"""Shared test setup: offline, headless, quiet progress bars, small thread count."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_DISABLE", "1")


def pytest_addoption(parser):
    parser.addoption("--book-html", default=None,
                     help="the executed book's HTML folder (e.g. _build/html) for tests/test_pages.py; "
                          "`make test` builds it and passes it")


@pytest.fixture
def one_thread():
    """torch on one thread for the test (timings and memory peaks of one process stay comparable)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_vit():
    """A one-block tiny ViT with seeded weights, frozen."""
    import torch

    from selagg_utils.models import tiny_vit

    torch.manual_seed(0)
    return tiny_vit(depth=1).eval().requires_grad_(False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty feature cache folder, set as $SELAGG_CACHE."""
    from selagg_utils.cache.keys import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def file_size_limit():
    """A real limit on the size of any file this process writes (RLIMIT_FSIZE), as a full disk would set."""
    resource = pytest.importorskip("resource")
    signal = pytest.importorskip("signal")
    if not hasattr(signal, "SIGXFSZ"):
        pytest.skip("no SIGXFSZ on this system")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes beyond the limit then fail with EFBIG

    def limit(size: int | None) -> None:
        """Files may grow to `size` bytes; None restores the limit the test started with."""
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft if size is None else size, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)


#: Test files that run longest (the full-scale rehearsal): collected first, so that `make test`'s two
#: pytest workers (`--dist loadfile --no-loadscope-reorder`) each start on one and share the rest.
LONGEST_FIRST = ("test_full_scale_tokens.py", "test_full_scale.py")


def pytest_collection_modifyitems(items):
    """Move the longest test files to the front, keeping every other test in its order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
