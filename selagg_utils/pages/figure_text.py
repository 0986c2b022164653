"""How large a figure's smallest text shows on the page: measured at the book's column width, so that
the tests can hold every figure to a legible size.
"""
from __future__ import annotations

from typing import NamedTuple

import matplotlib.pyplot as plt

from ..viz import COLUMN_PX

__all__ = ["MIN_TEXT_PX", "SmallestText", "smallest_text_px"]

#: The smallest text a figure may show, in pixels as displayed on the page.
MIN_TEXT_PX = 9.0


class SmallestText(NamedTuple):
    """The smallest visible text of a figure: its size in displayed pixels, and the text itself."""

    px: float
    text: str


def _visible_texts(artist):
    """Every visible, non-empty Text below an artist (tick labels only of drawn ticks, no axis of a hidden axes)."""
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis
    from matplotlib.text import Text

    if not artist.get_visible():
        return
    if isinstance(artist, Text):
        if artist.get_text().strip():
            yield artist
        return
    if isinstance(artist, Axis):
        children = [artist.label, artist.offsetText, *artist.get_majorticklabels(), *artist.get_minorticklabels()]
    else:
        children = artist.get_children()
    if isinstance(artist, Axes) and not artist.axison:
        children = [c for c in children if not isinstance(c, Axis)]
    for child in children:
        yield from _visible_texts(child)


def smallest_text_px(fig: plt.Figure, column_px: float = COLUMN_PX, dpi: float | None = None) -> SmallestText:
    """The smallest visible text of `fig` in pixels as the page displays it, and that text.

    A font of s points is s × dpi / 72 pixels in the picture; the picture is saved with
    bbox_inches="tight" (as Jupyter's inline backend and `figure_png` do), and a picture wider than
    the column is shrunk to `column_px`. `dpi` is the one the picture is saved at (the figure's own
    by default). A figure without text gives (inf, "").
    """
    dpi = fig.dpi if dpi is None else float(dpi)
    fig.draw_without_rendering()  # lays out ticks and texts as saving would
    box = fig.get_tightbbox(fig._get_renderer())
    width_px = (box.width + 2 * plt.rcParams["savefig.pad_inches"]) * dpi
    scale = float(min(1.0, column_px / width_px))
    texts = [(float(t.get_fontsize()) * dpi / 72 * scale, t.get_text()) for t in _visible_texts(fig)]
    return SmallestText(*min(texts, key=lambda pair: pair[0])) if texts else SmallestText(float("inf"), "")
