"""Numbers in the chapters' prose come from the run, from a paper, or from the code; none is typed by hand.

A figure in a Markdown cell passes when it is
- pasted by myst-nb's glue (`{glue:text}` and friends), so it is the reader's own run;
- in a sentence that cites its source (`{cite}`), as numbers quoted from papers are;
- a setting or a checked threshold: the same literal appears in one of the chapter's code cells
  (a percentage or a number of points also as its fraction: "75 %" is found as `0.75`), so
  changing the code shows up;
- a chapter, step or block number ("chapter 5"), or one of the lab's or ViT-B/16's defining sizes
  (LAB_SIZES);
- a small count (0 to 3), as in "two views" written with digits.
Code (fenced or inline), formulas, roles, links and exercise labels are not prose and are skipped.
"""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "notebooks").glob("0*.ipynb"))

#: The tiny lab's definition (32 px canvas, 16 px digits, 4 px patches, an 8 x 8 grid of 64 patches plus [cls],
#: width 128, 6 blocks, 10 classes) and ViT-B/16's (224 px, 16 px patches, 14 x 14 = 196 patches + [cls], width 768,
#: 12 blocks and heads).
LAB_SIZES = {"32", "16", "4", "8", "64", "65", "128", "6", "10", "224", "14", "196", "197", "768", "12"}
SMALL_COUNTS = {"0", "1", "2", "3"}

NUMBER = re.compile(r"(?<![\w.,/-])(\d[\d,]*(?:\.\d+)?)(\s?%|\s+points?)?(?![\w])")
FENCED = re.compile(r"(`{3,})[^\n]*\n.*?\1", re.S)  # fenced code, exercises' solutions included
NOT_PROSE = [re.compile(p, re.S) for p in (
    r"\{glue(?::\w+)?\}`[^`]*`",        # glued values
    r"`[^`]*`",                         # inline code and role targets
    r"\$\$.*?\$\$", r"\$[^$\n]*\$",     # formulas
    r"\]\([^)]*\)", r"https?://\S+",    # link targets
    r":label: \S+", r"\{[\w:-]+\}",     # exercise labels, role names
)]
#: Words after which a number names a part of the book, not a quantity: "chapter 5", "Step 3".
NAMING = re.compile(r"(chapters?|steps?|blocks?|block|exercise)\s+(\d+\s*(,|and|to|–|-)\s*)*$", re.I)


def sentences_of(markdown: str) -> list[tuple[bool, str]]:
    """(cited, prose) for every sentence of a Markdown cell; prose has code, formulas, roles and links blanked."""
    out = []
    for sentence in re.split(r"(?<=[.;!?])\s+|\n\s*\n|\n(?=[-*#] )", FENCED.sub(" ", markdown)):
        prose = sentence
        for pattern in NOT_PROSE:
            prose = pattern.sub(" ", prose)
        out.append(("{cite}" in sentence, prose))
    return out


def code_literals(nb: dict) -> set[str]:
    """Every number literal in the chapter's code cells, as a plain float's repr."""
    found = set()
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            for lit in re.findall(r"(?<![\w.])\d[\d_]*(?:\.\d+)?(?:e-?\d+)?", "".join(cell["source"])):
                found.add(repr(float(lit.replace("_", ""))))
    return found


def explained(text: str, scaled: bool, before: str, literals: set[str]) -> bool:
    """Whether one of the module's rules accounts for a figure."""
    value = float(text)
    return (text in SMALL_COUNTS or text in LAB_SIZES or bool(NAMING.search(before)) or repr(value) in literals
            or (scaled and repr(round(value / 100, 10)) in literals))


def unexplained_numbers(nb: dict) -> list[str]:
    """'cell i: "number" in "sentence"' for each figure in prose that none of the rules accounts for."""
    literals = code_literals(nb)
    problems = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        for cited, prose in sentences_of("".join(cell["source"])):
            if cited:
                continue
            for match in NUMBER.finditer(prose):
                text = match.group(1).replace(",", "")
                if not explained(text, bool(match.group(2)), prose[:match.start()], literals):
                    problems.append(f"cell {i}: {match.group(0)!r} in {' '.join(prose.split())[:120]!r}")
    return problems


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_no_hand_typed_figures_in_the_prose(path):
    problems = unexplained_numbers(json.loads(path.read_text()))
    assert not problems, "figures typed by hand (glue them, cite them, or take them from the code):\n" + "\n".join(problems)


def test_the_rules_catch_a_hand_typed_result_and_pass_what_they_should():
    nb = {"cells": [{"cell_type": "code", "source": ["RATIO = 0.75\nsteps = 60\n"]},
                    {"cell_type": "markdown", "source": [
                        "We mask 75 % of the patches for 60 steps. The probe reached 93.4 % here. "
                        "MAE reports 67.8 % {cite}`he2022mae`. Chapter 5 uses 64 patches. "
                        "Your run: {glue:text}`acc`. See `x = 12.5`."]}]}
    assert [p.split(": ", 1)[1].split(" in ")[0] for p in unexplained_numbers(nb)] == ["'93.4 %'"]
