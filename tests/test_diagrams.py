"""The book's diagrams draw, carry the labels the chapters rely on, and are never blank."""
import matplotlib

matplotlib.use("Agg")
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.patches import Patch
from matplotlib.text import Text

from selagg_utils.pages import diagrams, figure_text

# Words each diagram must show: the parts of the idea it draws.
LABELS = {
    "vit_tokens": ["[cls]", "$r_1$", "$h_1$", "$h_N$", "$T = N + R + 1$", "patch tokens"],
    "mae": ["[cls]", "encoder", "decoder", "loss on hidden patches only", "[M]"],
    "joint_embedding": ["view 1", "view 2", "[cls]", "$z_1$", "$z_2$", "pull together"],
    "attention_blocks": ["[cls] row", "register rows", "patch–patch block", "[cls] column", "key $j$", "query $i$"],
    "abmilp_head": ["$h_1$", "scorer", "softmax", "weighted sum", "linear classifier", "$w_{1}$"],
}


def texts(fig: plt.Figure) -> str:
    """Every piece of text drawn in a figure, its title included, joined by newlines."""
    return "\n".join(t.get_text() for t in fig.findobj(Text) if t.get_text())


def ink(fig: plt.Figure) -> float:
    """Share of the rendered pixels that are not white."""
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    return float((pixels < 250).any(-1).mean())


@pytest.mark.parametrize("name", sorted(diagrams.ALL))
def test_each_diagram_draws_its_labelled_parts(name):
    fig = diagrams.ALL[name]()
    try:
        shown = texts(fig)
        for label in LABELS[name]:
            assert label in shown, f"{name} lacks {label!r}"
        assert fig.axes[0].get_title(), f"{name} has no title"
        assert len(fig.axes[0].findobj(Patch)) > 8, f"{name} draws almost no shapes"
        assert ink(fig) > 0.05, f"{name} is almost blank"
    finally:
        plt.close(fig)


def test_token_kinds_keep_one_colour_in_every_diagram():
    colours = {matplotlib.colors.to_hex(c) for c in diagrams.COLOURS.values()}
    assert len(colours) == len(diagrams.COLOURS)  # no two kinds share a colour
    fig = diagrams.vit_tokens(registers=2)
    try:
        faces = [matplotlib.colors.to_hex(p.get_facecolor()) for p in fig.axes[0].patches]
        assert faces.count(diagrams.COLOURS["cls"].lower()) == 1  # one [cls]
        assert faces.count(diagrams.COLOURS["register"].lower()) == 2  # as many registers as asked
    finally:
        plt.close(fig)


def test_the_blank_check_can_fail():
    fig, ax = plt.subplots()
    ax.axis("off")
    try:
        assert ink(fig) < 0.01 and texts(fig) == ""
    finally:
        plt.close(fig)


def test_every_diagram_is_tested():
    assert set(LABELS) == set(diagrams.ALL)


def diagram_cells() -> list[tuple[str, dict, str]]:
    """(chapter, cell metadata, source) of every chapter cell that draws a diagram."""
    import json
    from pathlib import Path

    found = []
    for path in sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("0*.ipynb")):
        for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            source = "".join(cell["source"])
            if cell["cell_type"] == "code" and any(f"viz.diagram(\"{name}\"" in source for name in diagrams.ALL):
                found.append((path.stem, cell["metadata"], source))
    return found


def test_every_diagram_is_placed_with_alt_text_and_a_caption():
    drawn = set()
    for chapter, meta, source in diagram_cells():
        drawn |= {name for name in diagrams.ALL if f"viz.diagram(\"{name}\"" in source}
        assert "remove-input" in meta.get("tags", []), f"{chapter}: a diagram cell shows its code in the book"
        options = meta.get("mystnb", {})
        assert len(options.get("image", {}).get("alt", "")) > 40, f"{chapter}: a diagram without alt text"
        assert options.get("figure", {}).get("caption") and options["figure"].get("name", "").startswith("fig-")
    assert drawn == set(diagrams.ALL), f"diagrams no chapter shows: {set(diagrams.ALL) - drawn}"


@pytest.mark.parametrize("name", sorted(diagrams.ALL))
def test_each_diagram_text_is_legible_on_the_page(name):

    fig = diagrams.ALL[name]()
    try:
        px, text = figure_text.smallest_text_px(fig)
        assert px >= figure_text.MIN_TEXT_PX, (f"{name}: {text!r} shows at {px:.1f} px on the page (at least "
                                       f"{figure_text.MIN_TEXT_PX} px): a larger font, or a narrower figure")
    finally:
        plt.close(fig)


def test_headline_chart_shows_the_numbers_the_book_quotes():

    fig = diagrams.headline_chart()
    try:
        shown = texts(fig)
        for value in diagrams.PAPER_HEADLINE.values():
            assert f"{value:.1f} %" in shown, f"the headline chart lacks {value}"
        assert "joint-embedding" in shown and fig.axes[0].get_title()
        assert ink(fig) > 0.05
        px, text = figure_text.smallest_text_px(fig, dpi=100)  # saved at dpi 100 by book/_ext/headline_figure.py
        assert px >= figure_text.MIN_TEXT_PX, f"the headline chart's {text!r} shows at {px:.1f} px on the page"
    finally:
        plt.close(fig)
    intro = (Path(__file__).resolve().parents[1] / "book" / "intro.md").read_text(encoding="utf-8")
    for value in diagrams.PAPER_HEADLINE.values():  # the chart and the landing page's text agree
        assert f"{value:.1f} %" in intro



def test_paper_vs_lab_puts_the_papers_numbers_first_and_the_labs_after():

    fig = diagrams.paper_vs_lab({"the lab:\ntiny-mae": (0.513, 0.709)}, "paper and lab")
    try:
        labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        assert labels[0].startswith("the paper") and labels[1] == "the lab:\ntiny-mae"
        shown = texts(fig)
        for value in (*diagrams.PAPER_HEADLINE.values(), 51.3, 70.9):
            assert f"{value:.1f}" in shown, f"the chart lacks {value}"
        px, text = figure_text.smallest_text_px(fig)
        assert px >= figure_text.MIN_TEXT_PX, f"{text!r} shows at {px:.1f} px on the page"
    finally:
        plt.close(fig)
