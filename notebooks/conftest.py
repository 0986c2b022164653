"""One run per chapter: nbval executes it, with its solutions' code appended, and the book is built from it.

`make test` executes each chapter once, under nbval. The collector below adds cells to the run:
first a hidden probe that measures the smallest text of every figure the chapter draws, after the
chapter's own cells a check that none is under 9 px as the page shows it, then the chapter's
solution code from `book/solutions.md`, so the same kernel also runs every solution.
`ExecutedChapters` keeps each cell's outputs and, for every chapter whose cells all passed,
stores the executed chapter, without the added cells, in the book's jupyter-cache
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


#: Run first, hidden: every picture the chapter's cells make (a figure shown inline, or PNG bytes from
#: `pages.explorer.figure_png`) is measured as it is saved, with `pages.figure_text.smallest_text_px`
#: (the size its smallest text has on the page). Saving is where to look: `plt.show()` closes the figures before a cell ends.
FIGURE_TEXT_PROBE = """\
import matplotlib.backend_bases as _selagg_backend
from IPython import get_ipython as _selagg_ipython

_selagg_texts, _selagg_cell = [], [-1, ""]


def _selagg_next_cell(info):
    _selagg_cell[:] = [_selagg_cell[0] + 1, (info.raw_cell.strip().splitlines() or [""])[0][:60]]


def _selagg_measured(print_figure):
    def measured(canvas, *args, **kwargs):
        from selagg_utils.pages.figure_text import smallest_text_px

        dpi = kwargs.get("dpi")
        try:
            found = smallest_text_px(canvas.figure, dpi=dpi if isinstance(dpi, (int, float)) else None)
        except Exception as error:  # reported by the check cell, never breaking the chapter's own cell
            found = (0.0, f"(not measured: {error!r})")
        _selagg_texts.append((*_selagg_cell, *found))
        return print_figure(canvas, *args, **kwargs)
    return measured


_selagg_ipython().events.register("pre_run_cell", _selagg_next_cell)
_selagg_backend.FigureCanvasBase.print_figure = _selagg_measured(_selagg_backend.FigureCanvasBase.print_figure)
"""

#: Run after the chapter's own cells (before its solutions): no text on the page smaller than MIN_TEXT_PX.
FIGURE_TEXT_CHECK = """\
if _selagg_texts:
    from selagg_utils.pages.figure_text import MIN_TEXT_PX

    _n, _first, _px, _text = min(_selagg_texts, key=lambda t: t[2])
    print(f"smallest figure text: {_px:.1f} px, {_text!r} in Cell {_n} ({_first})")
    _selagg_small = [t for t in _selagg_texts if t[2] < MIN_TEXT_PX]
    assert not _selagg_small, f"{len(_selagg_small)} figure(s) show text under {MIN_TEXT_PX} px on the page: " + (
        "; ".join(f"Cell {n} ({first}): {text!r} at {px:.1f} px" for n, first, px, text in _selagg_small))
"""


class ChapterWithSolutions(IPyNbFile):
    """nbval's notebook collector: a hidden probe of figure text first, then the chapter's code cells,
    a check of their figures' text, and one cell per solution code block."""

    def collect(self):
        items = list(super().collect())  # reads self.nb; one item per code cell, numbered as in the chapter
        probe = nbformat.v4.new_code_cell(FIGURE_TEXT_PROBE, metadata={APPENDED: "figure-text-probe"})
        self.nb.cells.insert(0, probe)
        yield IPyNbCell.from_parent(self, name="Figure text probe", cell_num=-1, cell=probe,
                                    options=defaultdict(bool, check=False))
        yield from items
        number = len(items)
        check = nbformat.v4.new_code_cell(FIGURE_TEXT_CHECK, metadata={APPENDED: "figure-text-check"})
        self.nb.cells.append(check)
        yield IPyNbCell.from_parent(self, name="Figure text", cell_num=number, cell=check,
                                    options=defaultdict(bool, check=False))
        for i, code in enumerate(solution_code(self.path.name[:2])):
            cell = nbformat.v4.new_code_cell(code, metadata={APPENDED: "solution"})
            self.nb.cells.append(cell)
            yield IPyNbCell.from_parent(self, name=f"Solution {i + 1}", cell_num=number + 1 + i,
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
        self.figure_text: dict[str, str] = {}  # chapter: its smallest figure text, as the check cell printed it

    def pytest_runtest_logreport(self, report):
        """Each chapter's smallest figure text, also from test workers (user_properties travel with reports)."""
        for key, value in report.user_properties:
            if key == "figure_text":
                self.figure_text[value[0]] = value[1]

    def pytest_terminal_summary(self, terminalreporter):
        for chapter, line in sorted(self.figure_text.items()):
            terminalreporter.write_line(f"{chapter}: {line or 'no figure'}")

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
        if report.when == "call" and cell.metadata.get(APPENDED) == "figure-text-check":
            printed = "".join(out.get("text", "") for out in item.test_outputs or [] if out.get("output_type") == "stream")
            report.user_properties.append(("figure_text", (Path(str(parent.fspath)).name, printed.strip())))
        if report.when == "call" and item.test_outputs is not None and APPENDED not in cell.metadata:
            entry["count"] += 1  # the chapter's own cells are numbered 1, 2, ... as in a fresh run
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
