"""Shared test setup: offline, headless, quiet progress bars, small thread count."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_DISABLE", "1")


def pytest_addoption(parser):
    parser.addoption("--book-html", default=None,
                     help="the executed book's HTML folder (e.g. _build/html) for tests/test_pages.py; "
                          "`make test` builds it and passes it")
