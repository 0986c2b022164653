"""Chapters stay readable: no code cell a reader sees is longer than MAX_LINES lines."""
import json
from pathlib import Path

import pytest

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
