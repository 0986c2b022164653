"""Put a figure of a chapter's run on a page that runs no code ("What we found").

Chapter 6 glues its paper-versus-lab figure (`viz.glue("paper_vs_lab", fig)`). MyST-NB pastes a
glued figure only into its own page, so this extension reads the chapter's glue data once the
chapter has been read (executed or taken from the cache) and saves the picture as
`book/_generated/paper_vs_lab.png`, where book/what_we_found.md's figure directive looks for it.
The page is read after the chapter, so the picture is the one of the same build.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

from sphinx.application import Sphinx

CHAPTER, PAGE, KEY = "notebooks/06_selective_aggregation", "book/what_we_found", "paper_vs_lab"
TARGET = Path("book") / "_generated" / f"{KEY}.png"


def save_figure(app: Sphinx) -> None:
    """Save the chapter's glued figure, if its glue data is there (myst-nb writes it on reading)."""
    glue = Path(app.env.mystnb_config.output_folder) / f"{CHAPTER}.glue.json"
    if not glue.exists():
        return
    output = json.loads(glue.read_text(encoding="utf-8")).get(KEY, {})
    png = output.get("data", {}).get("image/png")
    if png:
        target = Path(app.srcdir) / TARGET
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(base64.b64decode(png))


def chapter_first(app: Sphinx, env, docnames: list[str]) -> None:
    """Read the page after the chapter, and save the figure of an earlier build for a page read alone."""
    if CHAPTER in docnames and PAGE in docnames:
        docnames.remove(PAGE)
        docnames.insert(docnames.index(CHAPTER) + 1, PAGE)
    save_figure(app)


def chapter_read(app: Sphinx, doctree) -> None:
    if app.env.docname == CHAPTER:
        save_figure(app)


def setup(app: Sphinx) -> dict:
    app.connect("env-before-read-docs", chapter_first)
    app.connect("doctree-read", chapter_read)
    return {"parallel_read_safe": False, "parallel_write_safe": True}
