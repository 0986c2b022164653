"""The package's two tiers: a small core the chapters import, and engine rooms behind one seam each.

The core is the flat modules of `selagg_utils`; each engine room is a sub-package. The map in
CONTRIBUTING.md lists both tiers. Every import counts here, at import time or inside a function,
type-only or not.
"""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "selagg_utils"
#: Each engine room and the one core module that may import it (None: only chapters 7-8, scripts and tests do).
SEAMS = {"cache": "features", "sweep": "probing", "weights": "models", "imagenette": "data", "pages": "viz",
         "scaleout": None, "bench": None}
#: What the core may weigh, counted as every package module that importing chapters 00-06's imports loads.
CORE_MODULES, CORE_LINES = 16, 3500


def module_files() -> dict[str, Path]:
    """Every package module by dotted name below the package ('features', 'cache.keys', 'cache' for its __init__)."""
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts and p != PACKAGE / "__init__.py"}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its file (functions and TYPE_CHECKING blocks included)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[:len(package) - node.level + 1] + [p for p in (node.module or "").split(".") if p]
        elif (node.module or "").split(".")[0] == "selagg_utils":
            base = node.module.split(".")[1:]
        else:
            continue
        for alias in node.names:
            target = ".".join(base + [alias.name])
            found.add(target if target in modules else ".".join(base))
    missing = {m for m in found if m and m not in modules}
    assert not missing, f"{name} imports package modules that do not exist: {sorted(missing)}"
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def room_of(module: str) -> str | None:
    return module.split(".")[0] if "." in module or module in SEAMS else None


def test_every_sub_package_is_an_engine_room_with_a_one_paragraph_docstring():
    rooms = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert rooms == set(SEAMS), f"sub-packages {rooms} and engine rooms {set(SEAMS)} differ: add the room to SEAMS"
    for room in rooms:
        doc = ast.get_docstring(ast.parse((PACKAGE / room / "__init__.py").read_text())) or ""
        assert doc.startswith("Engine room") and len(doc) > 200 and "\n\n" in doc, f"{room}/__init__.py: a paragraph"


def test_the_map_lists_every_module_of_both_tiers():
    text = (ROOT / "CONTRIBUTING.md").read_text().split("## Module map", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)?)` \(\d+\)", text))
    wanted = {m for m in module_files() if m not in SEAMS}
    assert wanted - listed == set(), f"modules missing from the map in CONTRIBUTING.md: {sorted(wanted - listed)}"
    assert listed - wanted == set(), f"the map names modules that do not exist: {sorted(listed - wanted)}"


def test_the_core_imports_only_modules_above_it_in_the_map():
    text = (ROOT / "CONTRIBUTING.md").read_text().split("### The core", 1)[1].split("\n### ", 1)[0]
    order = re.findall(r"`([a-z_]+)` \(\d+\)", text)
    assert len(order) >= 10, order
    up = [(m, t) for m, targets in graph().items() if m in order for t in targets
          if t in order and order.index(t) > order.index(m)]
    assert not up, f"core imports up the map (move the code, or the module in the map): {up}"


def test_the_core_imports_an_engine_room_only_through_its_seam():
    crossings = {(m, t) for m, targets in graph().items() if room_of(m) is None
                 for t in targets if room_of(t) is not None and SEAMS[room_of(t)] != m}
    assert not crossings, f"core modules importing an engine room past its seam: {sorted(crossings)}"


def test_no_import_cycle_of_any_kind():
    edges, done, path = graph(), set(), []

    def visit(m: str) -> None:
        assert m not in path, f"import cycle: {' -> '.join(path[path.index(m):] + [m])}"
        if m in done:
            return
        path.append(m)
        for t in sorted(edges[m]):
            visit(t)
        path.pop()
        done.add(m)

    for m in sorted(edges):
        visit(m)


def chapter_imports() -> set[str]:
    """The package modules chapters 00-06 import."""
    found = set()
    for nb in sorted((ROOT / "notebooks").glob("0[0-6]_*.ipynb")):
        for cell in json.loads(nb.read_text())["cells"]:
            if cell["cell_type"] != "code":
                continue
            code = re.sub(r"^(\s*)[%!].*$", r"\1pass", "".join(cell["source"]), flags=re.M)  # magics
            for node in ast.walk(ast.parse(code)):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "selagg_utils":
                    found |= {node.module} if node.module != "selagg_utils" else \
                        {f"selagg_utils.{a.name}" for a in node.names if (PACKAGE / f"{a.name}.py").exists()}
    return found


@pytest.mark.slow
def test_the_core_that_chapters_0_to_6_load_is_small():
    wanted = chapter_imports()
    assert {"selagg_utils.features", "selagg_utils.probing", "selagg_utils.attention"} <= wanted, wanted
    code = "".join(f"import {m}\n" for m in sorted(wanted)) + \
        "import sys; print('\\n'.join(sorted(k for k in sys.modules if k.split('.')[0] == 'selagg_utils')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=ROOT).stdout.split()
    rooms = [m for m in loaded if m.count(".") > 1 or (m.count(".") == 1 and m.split(".")[1] in SEAMS)]
    assert not rooms, f"importing the chapters' modules loads engine rooms: {rooms}"
    files = [PACKAGE / "__init__.py" if m == "selagg_utils" else PACKAGE / f"{m.split('.', 1)[1]}.py" for m in loaded]
    lines = sum(len(f.read_text().splitlines()) for f in files)
    assert len(files) <= CORE_MODULES and lines <= CORE_LINES, (
        f"the core is {len(files)} modules and {lines} lines (at most {CORE_MODULES} and {CORE_LINES}): {loaded}")


def test_every_module_stays_near_four_hundred_lines():
    long = {m: n for m, p in module_files().items() if (n := len(p.read_text().splitlines())) > 410}
    assert not long, f"modules over about 400 lines (cut them by job): {long}"


def parameter_counts(path: Path) -> dict[str, int]:
    """The number of parameters (self, cls, *args and **kwargs not counted) of each function in a file."""
    counts = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            counts[f"{path.name}:{node.lineno} {node.name}"] = sum(
                x.arg not in ("self", "cls") for x in a.posonlyargs + a.args + a.kwonlyargs)
    return counts


def test_no_function_takes_more_than_seven_parameters():
    """Past about six, related parameters travel as one small options dataclass (see CONTRIBUTING.md)."""
    files = [*module_files().values(), *(ROOT / "scripts").glob("*.py")]
    crowded = {name: n for path in files for name, n in parameter_counts(path).items() if n > 7}
    assert not crowded, f"functions with more than seven parameters (group them in an options dataclass): {crowded}"
    heads = parameter_counts(PACKAGE / "heads.py")  # make_head(name, dim, layout, **options): three
    assert [n for name, n in heads.items() if name.endswith(" make_head")] == [3], "the count itself is wrong"
