"""Every exercise has a solution on the solutions page, hidden everywhere, and every solution's code runs.

The solutions live in `book/solutions.md`, not in the chapters: a notebook opened in Colab or Jupyter shows
a `{solution}` directive as raw text, answer included. The slow test runs each chapter that has solution
code once, at the tiny scale, with that code appended as cells, and fails when a solution raises or a cell
runs past CELL_TIMEOUT. It costs one more run of the chapters, plus the solutions.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = {p.name[:2]: p for p in sorted((ROOT / "notebooks").glob("0*.ipynb"))}
SOLUTIONS = ROOT / "book" / "solutions.md"
#: Seconds one cell may take (chapter 6's cells and its variants solution take minutes on two busy cores).
CELL_TIMEOUT = 1200

DIRECTIVE = re.compile(r"^(`{3,})\{(exercise|solution)\}([^\n]*)\n(.*?)^\1[ \t]*$", re.S | re.M)
PYTHON = re.compile(r"^```python\n(.*?)^```[ \t]*$", re.S | re.M)
DROPDOWN = re.compile(r"^(`{3,})\{admonition\}[^\n]*\n:class: dropdown\n", re.M)


def markdown_of(path: Path) -> str:
    """All Markdown cells of a notebook, joined."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


def directives(text: str, kind: str) -> dict[str, str]:
    """Label -> body of every `{exercise}` (label from its option) or `{solution}` (label of its exercise)."""
    found = {}
    for _, name, argument, body in DIRECTIVE.findall(text):
        if name != kind:
            continue
        label = argument.strip() if kind == "solution" else re.search(r":label: (\S+)", body).group(1)
        found[label] = body
    return found


def page_sections() -> dict[str, str]:
    """The solutions page cut into its chapter sections, keyed by the chapter's two digits."""
    parts = re.split(r"^\(solutions-(\d\d)\)=\n", SOLUTIONS.read_text(encoding="utf-8"), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def solution_code(chapter: str) -> list[str]:
    """The Python blocks of a chapter's solutions, in page order."""
    return [code for body in directives(page_sections().get(chapter, ""), "solution").values()
            for code in PYTHON.findall(body)]


def numbered_questions(markdown: str) -> list[str]:
    """The numbered items of a chapter's "Check your understanding" section."""
    section = markdown.split("## Check your understanding", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\d+\. (.+)$", section, re.M)


def test_no_chapter_holds_a_solution():
    for path in CHAPTERS.values():
        assert "{solution}" not in path.read_text(encoding="utf-8"), f"{path.name} shows a solution in Colab"


def test_every_exercise_has_one_hidden_solution_and_links_to_it():
    solutions = directives(SOLUTIONS.read_text(encoding="utf-8"), "solution")
    exercises = {label: body for path in CHAPTERS.values()
                 for label, body in directives(markdown_of(path), "exercise").items()}
    assert exercises and set(exercises) == set(solutions)
    for label, body in exercises.items():
        assert f"<sol-{label[3:]}>" in body, f"{label} does not link to its solution"
        assert ":class: dropdown" in solutions[label], f"the solution of {label} is not folded"
        assert f":label: sol-{label[3:]}" in solutions[label]
        assert label[3:5] in page_sections() and label in page_sections()[label[3:5]], f"{label} in wrong section"


@pytest.mark.parametrize("chapter", sorted(CHAPTERS))
def test_each_chapter_asks_two_to_four_questions_answered_on_the_page(chapter):
    questions = numbered_questions(markdown_of(CHAPTERS[chapter]))
    assert 2 <= len(questions) <= 4, f"chapter {chapter} asks {len(questions)} questions"
    answers = page_sections()[chapter].split("### Check your understanding", 1)[1]
    assert len(DROPDOWN.findall(answers)) == len(questions)
    for i, question in enumerate(questions, 1):
        assert f"{{admonition}} {i}. {question}\n" in answers, f"chapter {chapter}, question {i} has no answer"


def test_the_parsers_find_what_they_should():
    text = "````{solution} ex-09-a\n:class: dropdown\n```python\nx = 1\n```\n````\n"
    assert directives(text, "solution") == {"ex-09-a": ":class: dropdown\n```python\nx = 1\n```\n"}
    assert PYTHON.findall(directives(text, "solution")["ex-09-a"]) == ["x = 1\n"]


def run_with_solutions(path: Path, code: list[str]) -> None:
    """Execute a chapter at the tiny scale with the solution code appended, one cell per block."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    nb.cells += [nbformat.v4.new_code_cell(block) for block in code]
    env = {"SELAGG_SCALE": "tiny", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.parametrize("chapter", [c for c in sorted(CHAPTERS) if solution_code(c)])
def test_solution_code_runs_at_the_end_of_its_chapter(chapter):
    run_with_solutions(CHAPTERS[chapter], solution_code(chapter))


def test_a_failing_solution_fails_the_run(tmp_path):
    from nbclient.exceptions import CellExecutionError

    chapter = tmp_path / "00_tiny.ipynb"
    chapter.write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    with pytest.raises(CellExecutionError, match="undefined_name"):
        run_with_solutions(chapter, ["x = 1\n", "print(undefined_name)\n"])


def test_no_fence_of_the_page_carries_a_backtick_in_its_title():
    # CommonMark: a backtick fence whose info string holds a backtick is no fence, and the page falls apart.
    bad = [line for line in SOLUTIONS.read_text(encoding="utf-8").splitlines()
           if re.match(r"^`{3,}\{", line) and "`" in line.lstrip("`")]
    assert not bad, bad
