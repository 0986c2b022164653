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
    from selagg_utils.cache_keys import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"
