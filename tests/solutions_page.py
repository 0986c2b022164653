"""The book's text read as data: the solutions page's exercises, solutions and code, per chapter,
and the Markdown of every page.

Plain functions, imported by the tests (`tests/test_solutions.py`, the pairing checks; the prose
checks) and by `notebooks/conftest.py` (which appends each chapter's solution code to its nbval run).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "book" / "solutions.md"

DIRECTIVE = re.compile(r"^(`{3,})\{(exercise|solution)\}([^\n]*)\n(.*?)^\1[ \t]*$", re.S | re.M)
PYTHON = re.compile(r"^```python\n(.*?)^```[ \t]*$", re.S | re.M)
DROPDOWN = re.compile(r"^(`{3,})\{admonition\}[^\n]*\n:class: dropdown\n", re.M)


def markdown_of(path: Path) -> str:
    """All Markdown cells of a notebook, joined."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


def reader_markdown() -> dict[str, str]:
    """Page name -> the Markdown a reader meets: each page under book/, each chapter's Markdown cells."""
    pages = {p.name: p.read_text(encoding="utf-8") for p in sorted((ROOT / "book").glob("*.md"))}
    pages.update({p.name: markdown_of(p) for p in sorted((ROOT / "notebooks").glob("0*.ipynb"))})
    return pages


def directives(text: str, kind: str) -> dict[str, str]:
    """Label -> body of every `{exercise}` (label from its option) or `{solution}` (its exercise's label)."""
    found = {}
    for _, name, argument, body in DIRECTIVE.findall(text):
        if name != kind:
            continue
        label = argument.strip() if kind == "solution" else re.search(r":label: (\S+)", body).group(1)
        found[label] = body
    return found


def page_sections(page: Path = SOLUTIONS) -> dict[str, str]:
    """The solutions page cut into its chapter sections, keyed by the chapter's two digits."""
    parts = re.split(r"^\(solutions-(\d\d)\)=\n", page.read_text(encoding="utf-8"), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def solution_code(chapter: str, page: Path = SOLUTIONS) -> list[str]:
    """The Python blocks of a chapter's solutions, in page order."""
    return [code for body in directives(page_sections(page).get(chapter, ""), "solution").values()
            for code in PYTHON.findall(body)]


def numbered_questions(markdown: str) -> list[str]:
    """The numbered items of a chapter's "Check your understanding" section."""
    section = markdown.split("## Check your understanding", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\d+\. (.+)$", section, re.M)
