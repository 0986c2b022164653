"""One run per chapter: nbval executes it, with its solutions' code appended, and the book is built from it.

`make test` executes each chapter once, under nbval. The collector below appends the chapter's
solution code from `book/solutions.md` as extra cells at the end, so the same kernel also runs
every solution. `ExecutedChapters` keeps each cell's outputs and, for every chapter whose cells
all passed, stores the executed chapter, without the appended cells, in the book's jupyter-cache
(`execute_notebooks: cache` in _config.yml), so the pages the build makes show that very run.

`make test-notebooks` runs two chapters at a time (pytest-xdist, a whole chapter per worker, one
torch thread each), the longest first; each worker stores its chapters under a file lock.
"""
from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

import nbformat
import pytest
import yaml
from nbval.plugin import IPyNbCell, IPyNbFile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from solutions_page import solution_code  # noqa: E402

#: Metadata key of a cell appended to a chapter for its test run (kept out of the book's cache).
APPENDED = "selagg_appended"


def book_cache_path() -> Path:
    """The jupyter-cache folder the book build reads, from _config.yml."""
    execute = yaml.safe_load((ROOT / "_config.yml").read_text()).get("execute", {})
    return ROOT / execute.get("cache", "_build/.jupyter_cache")


class ChapterWithSolutions(IPyNbFile):
    """nbval's notebook collector, plus one cell per solution code block at the chapter's end."""

    def collect(self):
        yield from super().collect()  # reads self.nb and yields one item per code cell
        number = sum(cell.cell_type == "code" for cell in self.nb.cells)
        for i, code in enumerate(solution_code(self.path.name[:2])):
            cell = nbformat.v4.new_code_cell(code, metadata={APPENDED: "solution"})
            self.nb.cells.append(cell)
            yield IPyNbCell.from_parent(self, name=f"Solution {i + 1}", cell_num=number + i,
                                        cell=cell, options=defaultdict(bool, check=False))


@pytest.hookimpl(wrapper=True)
def pytest_collect_file(file_path, parent):
    """Swap nbval's collector of a chapter for the one that appends its solutions."""
    found = yield
    return [ChapterWithSolutions.from_parent(parent, path=file_path) if type(c) is IPyNbFile else c
            for c in found]


def without_appended(nb):
    """A copy of an executed chapter without the cells appended for its test run."""
    copy = nbformat.from_dict(nb)
    copy.cells = [c for c in copy.cells if APPENDED not in c.get("metadata", {})]
    return copy


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
        if report.when == "call" and APPENDED not in cell.metadata:
            entry["end"] = time.perf_counter()  # the chapter's run time ends with its own last cell
        if report.when == "call" and item.test_outputs is not None:
            entry["count"] += 1
            cell.execution_count = entry["count"]
            cell.outputs = [_numbered(out, entry["count"]) for out in item.test_outputs]

    def pytest_sessionfinish(self, session):
        executed = {path: e for path, e in self.notebooks.items() if e["ok"] and e["count"]}
        if not executed:
            return
        from filelock import FileLock
        from jupyter_cache import get_cache
        from jupyter_cache.base import CacheBundleIn

        folder = book_cache_path()
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):  # two test workers may store at the same time
            cache = get_cache(str(folder))
            for path, entry in executed.items():
                nb = without_appended(entry["nb"])
                nbformat.validate(nb)
                bundle = CacheBundleIn(nb, str(path), data={"execution_seconds": entry["end"] - entry["start"]})
                cache.cache_notebook_bundle(bundle, check_validity=False, overwrite=True)


#: Chapters by run time, longest first, so that two test workers finish close together.
LONGEST_FIRST = ("06", "05", "08", "03", "04", "07", "02", "01", "00")


def pytest_collection_modifyitems(items):
    """Collect the longest chapters first (xdist hands whole chapters to its workers in that order)."""
    rank = {prefix: i for i, prefix in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name[:2], len(rank)))


def _numbered(output, count: int):
    """An nbval output as nbformat stores it (execute results carry the cell's execution count)."""
    if output.get("output_type") == "execute_result":
        output["execution_count"] = count
    return output


def pytest_configure(config):
    if config.getoption("nbval_lax", default=False) or config.getoption("nbval", default=False):
        config.pluginmanager.register(ExecutedChapters(), "selagg-executed-chapters")
