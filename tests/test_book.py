"""The book: every notebook is listed, stored clean, and the book builds with warnings as errors.

The build here does not execute the notebooks (nbval already runs each one); `make book` does.
"""
import json
import re
import shutil
import subprocess
import sys
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
    installs = re.findall(r"git\+(https://[^@\"]+)@", text)
    assert installs and set(installs) == {url}


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_assertion_cells_are_hidden_in_the_book(nb):
    for cell in json.loads(nb.read_text())["cells"]:
        if cell["cell_type"] == "code" and "".join(cell["source"]).lstrip().startswith("assert"):
            assert "remove-cell" in cell.get("metadata", {}).get("tags", []), "".join(cell["source"])[:80]


def test_book_builds_with_warnings_as_errors(tmp_path):
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["execute"]["execute_notebooks"] = "off"
    cfg = tmp_path / "_config.yml"
    cfg.write_text(yaml.safe_dump(config))
    jb = shutil.which("jupyter-book", path=str(Path(sys.executable).parent))
    result = subprocess.run([jb, "build", str(ROOT), "--config", str(cfg), "--path-output", str(tmp_path), "-W", "-n",
                             "--keep-going"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert (tmp_path / "_build" / "html" / "index.html").is_file()
