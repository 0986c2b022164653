"""Serve MathJax from the book's own files, so that formulas render on a laptop with no network.

The MathJax 3 distribution comes from the `django-static-mathjax` package (a plain copy of
MathJax's `es5` folder; Django itself is not needed). `mathjax_path` in `_config.yml` names the
entry script relative to `_static/`; this extension copies the files that script loads there.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError

# The entry script and what it may load lazily (TeX extensions, the menu, accessibility, speech).
PARTS = ("tex-svg.js", "input", "ui", "a11y", "sre")
TARGET = "mathjax"


def mathjax_source() -> Path:
    """The folder of MathJax's browser build installed with django-static-mathjax."""
    try:
        import mathjax
    except ImportError:
        raise ExtensionError("MathJax files are missing: install them with `pip install django-static-mathjax` "
                             "(part of requirements-dev.txt) and build again.") from None
    return Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"


def check_config(app: Sphinx, config) -> None:
    """Refuse a mathjax_path that the copied files do not provide (a CDN address, a typo)."""
    path = str(config.mathjax_path)
    if not path.startswith(f"{TARGET}/") or path.split("/", 1)[1] not in PARTS:
        raise ExtensionError(f"mathjax_path is {path!r}; set it to '{TARGET}/tex-svg.js' in _config.yml "
                             "(sphinx: config:) so that the book renders formulas offline.")
    mathjax_source()


def copy_mathjax(app: Sphinx, exception: Exception | None) -> None:
    """Copy MathJax's entry script and lazily loaded parts into the built site's _static/mathjax."""
    if exception is not None or app.builder.format != "html":
        return
    source, target = mathjax_source(), Path(app.outdir) / "_static" / TARGET
    target.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        if (source / part).is_dir():
            shutil.copytree(source / part, target / part, dirs_exist_ok=True)
        else:
            shutil.copy2(source / part, target / part)


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", check_config)
    app.connect("build-finished", copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
