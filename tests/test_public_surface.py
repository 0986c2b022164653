"""Every package name a chapter or a solution uses is public (in its module's `__all__`) and documented."""
import importlib
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {".".join(f.relative_to(ROOT / "selagg_utils").with_suffix("").parts)
           for f in (ROOT / "selagg_utils").rglob("*.py") if f.name != "__init__.py"}


def code_texts() -> dict[str, str]:
    """The code of each chapter notebook, and of the solutions page (which runs after its chapter)."""
    texts = {nb.name: "\n".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"]
                                if c["cell_type"] == "code")
             for nb in sorted((ROOT / "notebooks").glob("*.ipynb"))}
    solutions = (ROOT / "book" / "solutions.md").read_text()
    texts["solutions.md"] = "\n".join(re.findall(r"```(?:python|\{code-cell\}[^\n]*)\n(.*?)```", solutions, re.S))
    return texts


def package_names_used(text: str) -> set[tuple[str, str]]:
    """(module, name) for each package name the code uses: `module.name` through an imported module (or its
    alias), and each name imported from a module."""
    aliases, used = {}, set()
    for package, names in re.findall(r"^\s*from selagg_utils((?:\.\w+)*) import \(?([\w, \n]+?)\)?$", text, re.M):
        for item in re.split(r",\s*", names.strip()):
            name, _, alias = (part.strip() for part in item.partition(" as "))
            full = f"{package[1:]}.{name}".lstrip(".")
            if full in MODULES:
                aliases[alias or name] = full
            elif package[1:] in MODULES and name:
                used.add((package[1:], name))
    used |= {(aliases[m], n) for m, n in re.findall(r"(?<![\w.])([a-z_]+)\.([A-Za-z_]\w*)", text) if m in aliases}
    return used


def test_every_package_name_the_book_uses_is_public_and_documented():
    texts = code_texts()
    shared = "\n".join(line for text in texts.values() for line in re.findall(r"^from selagg_utils.*$", text, re.M))
    texts["solutions.md"] = shared + "\n" + texts["solutions.md"]  # the solutions run after their chapter
    used = {(where, m, n) for where, text in texts.items() for m, n in package_names_used(text)}
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
    for name in sorted(MODULES):
        module = importlib.import_module(f"selagg_utils.{name}")
        missing = [n for n in getattr(module, "__all__", None) or ["<no __all__>"] if not hasattr(module, n)]
        assert not missing, f"{name}.__all__ names what the module does not define: {missing}"


def test_every_package_name_a_script_or_hook_uses_exists():
    """Scripts and the book's hooks run outside the test suite's usual paths: a name they use that moved is a
    crash on a reader's machine."""
    files = [*(ROOT / "scripts").glob("*.py"), *(ROOT / "book" / "_ext").glob("*.py"), ROOT / "notebooks" / "conftest.py"]
    used = {(f.name, m, n) for f in files for m, n in package_names_used(f.read_text())}
    assert len(used) > 50, "the scan found too few names: it would pass on anything"
    missing = [f"{where}: {m}.{n}" for where, m, n in sorted(used)
               if not hasattr(importlib.import_module(f"selagg_utils.{m}"), n)]
    assert not missing, "names that no longer exist:\n" + "\n".join(missing)
