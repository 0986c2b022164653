"""The book speaks of its subject, not of how it is made: no targets, goals or gates set for the book.

Every chapter's Markdown cells and every page under book/ are read, less code (fenced and inline),
so that names such as `"abmilp-gated"` and the prose's "gated attention" pass. Phrases are matched,
never bare words: a "target" of a loss, or a chapter's "Learning goals", is the subject itself.
"""
import re
from pathlib import Path

import pytest
from solutions_page import markdown_of

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "notebooks").glob("0*.ipynb")) + sorted((ROOT / "book").glob("*.md"))

#: Words about how the book is planned or built, which a reader has no use for.
PLANNING = re.compile(r"|".join([
    r"\bthe book'?s (?:target|goal|aim)s?\b", r"\bour (?:goal|target|aim)s?\b", r"\bthe goal (?:of|is|was|for)\b",
    r"\btarget of\b", r"\bgates?\b", r"\bas the book did before\b", r"\bthis book aims\b",
]), re.I)
CODE = re.compile(r"(`{3,}|~{3,})[^\n]*\n.*?\1|`[^`\n]*`", re.S)


def prose(path: Path) -> str:
    """The page's text a reader reads as prose: Markdown cells of a chapter, or a page's Markdown."""
    return CODE.sub(" ", markdown_of(path) if path.suffix == ".ipynb" else path.read_text(encoding="utf-8"))


def planning_phrases(text: str) -> list[str]:
    """Each planning phrase found, with the words around it."""
    return [" ".join(text[max(0, m.start() - 40):m.end() + 30].split()) for m in PLANNING.finditer(text)]


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_the_text_speaks_of_the_subject_not_of_the_plan(path):
    found = planning_phrases(prose(path))
    assert not found, (f"{path.name}: {len(found)} sentence(s) about the book's plan rather than its subject; "
                       f"say what the run shows instead: " + " | ".join(found))


def test_planning_phrases_are_found_and_the_subject_words_are_not():
    text = ("Our goal is one hour. The book's target for the run is 40 %. Three gates say whether the lab is fit. "
            "Holding tokens, as the book did before, peaked. The goal of the whole grid is near.")
    assert len(planning_phrases(text)) == 5
    subject = ("## Learning goals\nThe gated attention of Ilse et al. predicts a target: the normalised pixels, the "
               "regression targets of MAE. Run `abmilp-gated`.\n```python\ngates = 1  # the goal of\n```\n")
    assert planning_phrases(CODE.sub(" ", subject)) == []
