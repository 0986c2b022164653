"""Keep what nbval executes: every chapter whose cells all pass is stored in the book's jupyter-cache.

`make test` executes each chapter once, under nbval, and then builds the book from this cache
(`execute_notebooks: cache` in _config.yml), so the pages it checks show the outputs of that very run.
"""
from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def book_cache_path() -> Path:
    """The jupyter-cache folder the book build reads, from _config.yml."""
    execute = yaml.safe_load((ROOT / "_config.yml").read_text()).get("execute", {})
    return ROOT / execute.get("cache", "_build/.jupyter_cache")


class ExecutedChapters:
    """Collects each nbval cell's outputs into its notebook; stores notebooks that passed whole."""

    def __init__(self) -> None:
        self.notebooks: dict[Path, dict] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = (yield).get_result()
        cell, parent = getattr(item, "cell", None), getattr(item, "parent", None)
        if cell is None or not hasattr(parent, "nb") or report.when == "teardown":
            return
        entry = self.notebooks.setdefault(Path(str(parent.fspath)), {"nb": parent.nb, "ok": True, "count": 0,
                                                                      "start": time.perf_counter()})
        entry["ok"] &= not report.failed and not report.skipped
        entry["end"] = time.perf_counter()  # the chapter's run time ends with its last cell
        if report.when == "call" and item.test_outputs is not None:
            entry["count"] += 1
            cell.execution_count = entry["count"]
            cell.outputs = [_numbered(out, entry["count"]) for out in item.test_outputs]

    def pytest_sessionfinish(self, session):
        executed = {path: e for path, e in self.notebooks.items() if e["ok"] and e["count"]}
        if not executed:
            return
        from jupyter_cache import get_cache
        from jupyter_cache.base import CacheBundleIn

        cache = get_cache(str(book_cache_path()))
        for path, entry in executed.items():
            nbformat.validate(entry["nb"])
            bundle = CacheBundleIn(entry["nb"], str(path),
                                   data={"execution_seconds": entry["end"] - entry["start"]})
            cache.cache_notebook_bundle(bundle, check_validity=False, overwrite=True)


def _numbered(output, count: int):
    """An nbval output as nbformat stores it (execute results carry the cell's execution count)."""
    if output.get("output_type") == "execute_result":
        output["execution_count"] = count
    return output


def pytest_configure(config):
    if config.getoption("nbval_lax", default=False) or config.getoption("nbval", default=False):
        config.pluginmanager.register(ExecutedChapters(), "selagg-executed-chapters")
