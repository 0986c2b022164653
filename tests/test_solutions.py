"""Every exercise has a solution on the solutions page, hidden everywhere, and every solution's code runs.

The solutions live in `book/solutions.md`, not in the chapters: a notebook opened in Colab or Jupyter shows
a `{solution}` directive as raw text, answer included. Their code runs in the chapters' one test run:
`notebooks/conftest.py` appends each chapter's solution code as cells at the end of its nbval run, and keeps
them out of the book. The tests here check the pairing, and that appended solutions run and fail the run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from solutions_page import (
    DIRECTIVE,
    DROPDOWN,
    PYTHON,
    SOLUTIONS,
    directives,
    markdown_of,
    numbered_questions,
    page_sections,
    solution_code,
)

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = {p.name[:2]: p for p in sorted((ROOT / "notebooks").glob("0*.ipynb"))}

#: An exercise's title starts with one of these: warm-up, practice, challenge (explained on the solutions page).
DIFFICULTY = ("★☆☆", "★★☆", "★★★")
OUTCOME = re.compile(r"^\*\*Expected outcome:\*\* \S.{20,}", re.M)


def exercise_gaps(markdown: str) -> list[str]:
    """One sentence per exercise whose title lacks a difficulty mark or whose text lacks an expected outcome."""
    gaps = []
    for _, name, title, body in DIRECTIVE.findall(markdown):
        if name != "exercise":
            continue
        label = re.search(r":label: (\S+)", body).group(1)
        if not (title.strip().startswith(DIFFICULTY) and len(title.strip()) > 4):
            gaps.append(f"{label}: its title {title.strip()!r} does not start with one of {DIFFICULTY} and a name")
        if not OUTCOME.search(body):
            gaps.append(f"{label}: no line starting '**Expected outcome:**' says what the reader should see")
    return gaps


@pytest.mark.parametrize("chapter", sorted(CHAPTERS))
def test_every_exercise_has_a_difficulty_and_an_expected_outcome(chapter):
    gaps = exercise_gaps(markdown_of(CHAPTERS[chapter]))
    assert not gaps, "; ".join(gaps)


def test_the_difficulty_marks_are_explained_on_the_solutions_page_and_for_authors():
    for page in (SOLUTIONS, ROOT / "CONTRIBUTING.md"):
        assert all(mark in page.read_text(encoding="utf-8") for mark in DIFFICULTY), f"{page.name} lacks a mark"


def test_an_exercise_without_a_mark_or_an_outcome_is_named():
    good = ("```{exercise} ★★☆ Views\n:label: ex-09-a\nDo it.\n\n**Expected outcome:** a lower loss than with "
            "crops, far below chance.\n\nSolution: x\n```\n")
    assert exercise_gaps(good) == []
    no_mark = good.replace("★★☆ Views", "Views")
    no_outcome = good.replace("**Expected outcome:**", "You will see")
    assert len(exercise_gaps(no_mark)) == 1 and "ex-09-a: its title" in exercise_gaps(no_mark)[0]
    assert len(exercise_gaps(no_outcome)) == 1 and "Expected outcome" in exercise_gaps(no_outcome)[0]
    assert len(exercise_gaps(good.replace("★★☆ Views", "★★☆"))) == 1  # a mark without a name


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


#: Code in the solutions page's folded dropdowns fits about 73 characters at a 1280 px window.
SOLUTION_COLUMN_CHARS = 73


def test_solution_code_fits_its_dropdown():
    wide = [(len(line), line) for code in re.findall(r"```python\n(.*?)```", SOLUTIONS.read_text(), re.S)
            for line in code.splitlines() if len(line) > SOLUTION_COLUMN_CHARS]
    assert not wide, f"solution code lines wider than {SOLUTION_COLUMN_CHARS} characters (ruff format): {wide}"


def test_the_parsers_find_what_they_should():
    text = "````{solution} ex-09-a\n:class: dropdown\n```python\nx = 1\n```\n````\n"
    assert directives(text, "solution") == {"ex-09-a": ":class: dropdown\n```python\nx = 1\n```\n"}
    assert PYTHON.findall(directives(text, "solution")["ex-09-a"]) == ["x = 1\n"]


def test_no_fence_of_the_page_carries_a_backtick_in_its_title():
    # CommonMark: a backtick fence whose info string holds a backtick is no fence, and the page falls apart.
    bad = [line for line in SOLUTIONS.read_text(encoding="utf-8").splitlines()
           if re.match(r"^`{3,}\{", line) and "`" in line.lstrip("`")]
    assert not bad, bad


def nbval(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """pytest with nbval on a project folder's notebooks, as `make test` runs it (inline figures)."""
    env = {**os.environ, "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    return subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "-q", "-p", "no:cacheprovider", *args,
                           "notebooks"], cwd=folder, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_the_chapters_test_run_appends_every_solution():
    done = nbval(ROOT, "--collect-only")
    assert done.returncode == 0, done.stdout + done.stderr
    for chapter, path in CHAPTERS.items():
        appended = re.findall(rf"{path.name}::Solution (\d+)", done.stdout)
        assert len(appended) == len(solution_code(chapter)), f"chapter {chapter}: {appended}"


def mini_book(folder: Path, solution: str, code: str = "x = 41") -> Path:
    """A one-chapter copy of the book's test set-up whose chapter has one solution, `solution`."""
    for name in ("notebooks/conftest.py", "tests/solutions_page.py", "_config.yml"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, folder / name)
    (folder / "book").mkdir()
    fence = "````"
    (folder / "book" / "solutions.md").write_text(
        f"(solutions-00)=\n{fence}{{solution}} ex-00-a\n:label: sol-00-a\n:class: dropdown\n"
        f"```python\n{solution}\n```\n{fence}\n", encoding="utf-8")
    cell = {"id": "c0", "cell_type": "code", "source": code, "metadata": {}, "outputs": [], "execution_count": None}
    nb = {"cells": [cell], "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3"}},
          "nbformat": 4, "nbformat_minor": 5}
    (folder / "notebooks" / "00_tiny.ipynb").write_text(json.dumps(nb))
    return folder


@pytest.mark.slow
def test_an_appended_solution_runs_after_the_chapter_and_stays_out_of_the_book(tmp_path):
    from jupyter_cache import get_cache

    done = nbval(mini_book(tmp_path, "open('ran.txt', 'w').write(str(x + 1))"))
    assert done.returncode == 0 and "4 passed" in done.stdout, done.stdout + done.stderr  # probe, cell, check, solution
    assert (tmp_path / "notebooks" / "ran.txt").read_text() == "42", "the solution did not run in the chapter's kernel"
    records = get_cache(str(tmp_path / "_build" / ".jupyter_cache")).list_cache_records()
    assert len(records) == 1
    cached = get_cache(str(tmp_path / "_build" / ".jupyter_cache")).get_cache_bundle(records[0].pk).nb
    assert [c.source for c in cached.cells] == ["x = 41"], "the solution's or the figure check's cell reached the book"
    assert cached.cells[0].execution_count == 1, "the chapter's cells are not numbered as its own"


@pytest.mark.slow
def test_a_failing_solution_fails_the_run_and_keeps_the_chapter_out_of_the_book(tmp_path):
    done = nbval(mini_book(tmp_path, "print(undefined_name)"))
    assert done.returncode == 1 and "undefined_name" in done.stdout, done.stdout + done.stderr
    assert not (tmp_path / "_build" / ".jupyter_cache").exists()


FIGURE = """\
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(4, 3))
ax.plot([0, 1])
ax.set_title("{title}", fontsize={size})
plt.show()"""


@pytest.mark.slow
def test_a_figure_with_small_text_fails_the_chapter_run_naming_cell_and_text(tmp_path):
    done = nbval(mini_book(tmp_path, "x = 1", code=FIGURE.format(title="tiny words", size=3.6)))  # 5 px at 100 dpi
    assert done.returncode == 1 and "Figure text" in done.stdout, done.stdout + done.stderr
    assert "'tiny words' at 5.0 px" in done.stdout and "Cell 0" in done.stdout, done.stdout
    assert not (tmp_path / "_build" / ".jupyter_cache").exists()


@pytest.mark.slow
def test_a_figure_with_legible_text_passes_and_its_smallest_text_is_reported(tmp_path):
    done = nbval(mini_book(tmp_path, "x = 1", code=FIGURE.format(title="words", size=12)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "00_tiny.ipynb: smallest figure text:" in done.stdout, done.stdout
