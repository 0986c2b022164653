"""The book: every notebook is listed, stored clean, and the book builds with warnings as errors.

The build itself (warnings as errors, from the outputs of the nbval run) and its pages are checked by
`make test-pages` (tests/test_pages.py).
"""
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [ch["file"] for part in toc["parts"] for ch in part["chapters"]]


def test_every_notebook_is_in_the_toc_in_order():
    listed = [f for f in _toc_files() if f.startswith("notebooks/")]
    assert listed == [f"notebooks/{nb.stem}" for nb in NOTEBOOKS]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs_and_follows_the_template(nb):
    cells = json.loads(nb.read_text())["cells"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in cells if c["cell_type"] == "code")
    assert cells[0]["cell_type"] == "markdown" and cells[0]["source"][0].startswith("# ")
    text = "".join("".join(c["source"]) for c in cells)
    assert "Learning goals" in text and "config.scale()" in text and "## Summary" in text


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_install_names_the_repository_of_the_config(nb):
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    text = "".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"])
    repos = re.findall(r'^REPO = "(https://[^"]+)"$', text, re.M)
    assert repos == [url], f"the setup cell names {repos}, _config.yml {url}"
    assert '%pip install -q "selagg-utils @ git+{REPO}@main"' in text


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_assertion_cells_are_hidden_in_the_book(nb):
    for cell in json.loads(nb.read_text())["cells"]:
        if cell["cell_type"] == "code" and "".join(cell["source"]).lstrip().startswith("assert"):
            assert "remove-cell" in cell.get("metadata", {}).get("tags", []), "".join(cell["source"])[:80]


def test_book_math_comes_from_its_own_files():
    import importlib.util

    config = yaml.safe_load((ROOT / "_config.yml").read_text())["sphinx"]
    spec = importlib.util.spec_from_file_location("offline_math", ROOT / "book" / "_ext" / "offline_math.py")
    offline_math = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(offline_math)
    assert config["local_extensions"]["offline_math"] == "book/_ext"
    assert (offline_math.mathjax_source() / config["config"]["mathjax_path"].split("/", 1)[1]).is_file()

    class Config:
        mathjax_path = "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"

    with pytest.raises(Exception, match="renders formulas offline"):
        offline_math.check_config(None, Config())


def test_landing_page_figure_is_drawn_by_the_books_code(tmp_path):
    """book/_ext/headline_figure.py draws intro.md's figure at build time: no image is committed."""
    import importlib.util

    config = yaml.safe_load((ROOT / "_config.yml").read_text())["sphinx"]
    assert config["local_extensions"]["headline_figure"] == "book/_ext"
    spec = importlib.util.spec_from_file_location("headline_figure", ROOT / "book" / "_ext" / "headline_figure.py")
    headline_figure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(headline_figure)
    intro = (ROOT / "book" / "intro.md").read_text(encoding="utf-8")
    assert f"```{{figure}} {headline_figure.TARGET.relative_to('book').as_posix()}" in intro
    assert not (ROOT / headline_figure.TARGET).exists() or "book/_generated/" in (ROOT / ".gitignore").read_text()

    class App:
        srcdir = str(tmp_path)

    headline_figure.draw_headline(App())
    assert (tmp_path / headline_figure.TARGET).stat().st_size > 5000


#: An admonition that takes no title (note, tip, ...) reads a first-line text as its body, and
#: MyST warns when options follow it: a titled fold is `{admonition} Title` with `:class: note dropdown`.
UNTITLED_WITH_TEXT = re.compile(r"^(?::::+|```+)\{(?:note|tip|hint|important|warning|caution|attention|danger|error)\}"
                                r"[ \t]+\S[^\n]*\n:", re.M)


def test_no_admonition_puts_its_title_where_its_body_goes():
    from solutions_page import reader_markdown

    wrong = [name for name, text in reader_markdown().items() if UNTITLED_WITH_TEXT.search(text)]
    assert not wrong, f"{wrong}: use :::{{admonition}} Title with :class: note dropdown"
    assert UNTITLED_WITH_TEXT.search(":::{note} Under the hood\n:class: dropdown\ntext\n:::")
    assert not UNTITLED_WITH_TEXT.search(":::{admonition} Under the hood\n:class: note dropdown\n:::")
