"""Every package name a chapter or a solution uses is public (in its module's `__all__`) and documented."""
import importlib
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = re.compile(r"from selagg_utils import ([\w, ]+)")


def code_texts() -> dict[str, str]:
    """The code of each chapter notebook, and of the solutions page (which runs after its chapter)."""
    texts = {nb.name: "\n".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"]
                                if c["cell_type"] == "code")
             for nb in sorted((ROOT / "notebooks").glob("*.ipynb"))}
    solutions = (ROOT / "book" / "solutions.md").read_text()
    texts["solutions.md"] = "\n".join(re.findall(r"```(?:python|\{code-cell\}[^\n]*)\n(.*?)```", solutions, re.S))
    return texts


def package_names_used(text: str, modules: set[str]) -> set[tuple[str, str]]:
    """(module, name) for each `module.name` in the code whose module the code imports from the package."""
    imported = {m.strip() for line in IMPORTS.findall(text) for m in line.split(",")} & modules
    return {(m, n) for m, n in re.findall(r"(?<![\w.])([a-z_]+)\.([A-Za-z_]\w*)", text) if m in imported}


def test_every_package_name_the_book_uses_is_public_and_documented():
    modules = {p.stem for p in (ROOT / "selagg_utils").glob("*.py")} - {"__init__"}
    texts = code_texts()
    shared = {m for text in texts.values() for line in IMPORTS.findall(text) for m in line.split(",")}
    texts["solutions.md"] = "from selagg_utils import " + ", ".join(sorted(shared)) + "\n" + texts["solutions.md"]
    used = {(where, m, n) for where, text in texts.items() for m, n in package_names_used(text, modules)}
    assert len({(m, n) for _, m, n in used}) > 100, "the scan found too few names: it would pass on anything"
    problems = []
    for where, m, n in sorted(used):
        module = importlib.import_module(f"selagg_utils.{m}")
        obj = getattr(module, n, None)
        if n not in module.__all__:
            problems.append(f"{where}: {m}.{n} is not in {m}.__all__" + (" (no such name)" if obj is None else ""))
        elif callable(obj) and not (obj.__doc__ or "").strip():
            problems.append(f"{where}: {m}.{n} has no docstring")
    assert not problems, "\n".join(problems)


def test_every_module_says_what_it_exports():
    for path in sorted((ROOT / "selagg_utils").glob("*.py")):
        if path.stem == "__init__":
            continue
        module = importlib.import_module(f"selagg_utils.{path.stem}")
        missing = [n for n in getattr(module, "__all__", None) or ["<no __all__>"] if not hasattr(module, n)]
        assert not missing, f"{path.stem}.__all__ names what the module does not define: {missing}"
