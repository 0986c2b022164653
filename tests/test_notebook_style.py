"""Chapters stay readable: no code cell a reader sees is longer than MAX_LINES lines, nor any of its lines
wider than the page's column (CODE_COLUMN_CHARS characters, measured in Chromium by tests/pagecheck.py)."""
import json
from pathlib import Path

import pytest
from pagecheck import CODE_COLUMN_CHARS

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "notebooks").glob("0*.ipynb"))
#: The longest code cell a reader meets. Hidden assertion cells (tag `remove-cell`) are exempt; cells whose input
#: the book hides (`remove-input`) are not, since Colab and Jupyter show them.
MAX_LINES = 20


def long_cells(nb: dict) -> list[tuple[int, int]]:
    """(index, lines) of every visible code cell longer than MAX_LINES, trailing blank lines not counted."""
    found = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code" or "remove-cell" in cell["metadata"].get("tags", []):
            continue
        lines = len("".join(cell["source"]).rstrip().splitlines())
        if lines > MAX_LINES:
            found.append((i, lines))
    return found


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_no_visible_code_cell_is_too_long(path):
    assert long_cells(json.loads(path.read_text(encoding="utf-8"))) == [], (
        f"{path.name}: split these cells (index, lines) with prose between, or move the logic into the package")


def test_a_long_cell_is_found_and_a_hidden_one_is_not():
    def cell(lines, tags=()):
        return {"cell_type": "code", "metadata": {"tags": list(tags)}, "source": ["x = 1\n"] * lines}
    nb = {"cells": [cell(MAX_LINES), cell(MAX_LINES + 1), cell(40, ["remove-cell"]), cell(40, ["remove-input"])]}
    assert long_cells(nb) == [(1, MAX_LINES + 1), (3, 40)]


def wide_lines(nb: dict, limit: int = CODE_COLUMN_CHARS) -> list[tuple[int, int, str]]:
    """(cell index, length, line) of every line of a visible code cell longer than `limit` characters."""
    found = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code" or "remove-cell" in cell["metadata"].get("tags", []):
            continue
        found += [(i, len(line), line) for line in "".join(cell["source"]).splitlines() if len(line) > limit]
    return found


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_no_visible_code_line_is_wider_than_the_column(path):
    wide = wide_lines(json.loads(path.read_text(encoding="utf-8")))
    assert wide == [], (
        f"{path.name}: {len(wide)} code line(s) longer than {CODE_COLUMN_CHARS} characters scroll sideways on the "
        f"page, e.g. cell {wide[0][0]} ({wide[0][1]} characters): {wide[0][2]!r}; `make format` wraps most of them")


def test_a_wide_line_is_found_and_one_in_a_hidden_cell_is_not():
    def cell(line, tags=(), kind="code"):
        return {"cell_type": kind, "metadata": {"tags": list(tags)}, "source": ["x = 1\n", line]}
    wide, fits = "y = " + "1" * (CODE_COLUMN_CHARS - 3), "y = " + "1" * (CODE_COLUMN_CHARS - 4)
    nb = {"cells": [cell(fits), cell(wide), cell(wide, ["remove-cell"]), cell(wide, ["remove-input"]),
                    cell(wide, kind="markdown")]}
    assert wide_lines(nb) == [(1, CODE_COLUMN_CHARS + 1, wide), (3, CODE_COLUMN_CHARS + 1, wide)]


def fenced_lines(markdown: str) -> list[str]:
    """The lines inside the markdown's code fences (```bash, ```python, ...), directives like ```{figure} not."""
    lines, fence, indent = [], None, 0  # fence: None outside, else "code" or "directive"
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fence = None if fence else "directive" if line.lstrip()[3:].startswith("{") else "code"
            indent = len(line) - len(line.lstrip())  # a fence inside a list item: the page drops it
        elif fence == "code":
            lines.append(line[indent:])
    return lines


def test_no_code_block_in_the_prose_is_wider_than_the_column():
    from solutions_page import reader_markdown  # the solutions fold their code: test_solutions.py checks it

    wide = [(name, line) for name, text in reader_markdown().items() if name != "solutions.md"
            for line in fenced_lines(text) if len(line) > CODE_COLUMN_CHARS]
    assert not wide, f"code lines in the prose wider than {CODE_COLUMN_CHARS} characters (wrap with `\\`): {wide}"


def test_fenced_lines_are_found_and_directives_are_not():
    text = "```bash\nmake book\n```\n```{figure} a.png\n:alt: x\n```\n  ```python\n  x = 1\n  ```"
    assert fenced_lines(text) == ["make book", "x = 1"]
