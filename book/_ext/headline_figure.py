"""Draw the landing page's figure at build time, from the book's own code.

`selagg_utils.pages.diagrams.headline_chart` draws the paper's headline (the numbers the book quotes);
this extension saves it as `book/_generated/headline.png` before Sphinx reads the pages, so the
repository holds no image that could fall out of step with the code.
"""
from __future__ import annotations

from pathlib import Path

from sphinx.application import Sphinx

TARGET = Path("book") / "_generated" / "headline.png"


def draw_headline(app: Sphinx) -> None:
    """Save the headline chart where book/intro.md's figure directive looks for it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from selagg_utils.pages import diagrams

    target = Path(app.srcdir) / TARGET
    target.parent.mkdir(parents=True, exist_ok=True)
    fig = diagrams.headline_chart()
    try:
        fig.savefig(target, dpi=100, bbox_inches="tight", metadata={"Software": None})
    finally:
        plt.close(fig)


def setup(app: Sphinx) -> dict:
    app.connect("builder-inited", draw_headline)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
