"""The package's imports run the way CONTRIBUTING.md's module map says, and form no cycle."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "selagg_utils"
#: Imports up the map that the map itself names as exceptions (done inside a function, at call time).
ALLOWED_UP = {("bench", "bench_probes")}


def map_order() -> list[str]:
    """The modules in the order of the module map's table in CONTRIBUTING.md."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    table = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[2] for line in table.splitlines() if line.startswith("|") and line.count("|") >= 4]
    return [name for row in rows[2:] for name in re.findall(r"`([a-z_]+)` \(\d+\)", row)]


def package_imports(module: str) -> list[tuple[str, bool]]:
    """(imported package module, whether at import time) for each relative import outside `if TYPE_CHECKING:`."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                 and getattr(node.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(node)}
    in_function = {id(n) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in type_only:
            targets = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            found += [(t, id(node) not in in_function) for t in targets if (PACKAGE / f"{t}.py").exists()]
    return found


def test_the_map_lists_each_module_once_and_imports_run_down_it():
    order = map_order()
    assert len(order) == len(set(order)) and len(order) > 20, order
    missing = [m for m in order if not (PACKAGE / f"{m}.py").exists()]
    assert not missing, f"the module map names modules that do not exist: {missing}"
    unlisted = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__" and p.stem not in order)
    assert not unlisted, f"modules missing from the module map in CONTRIBUTING.md: {unlisted}"
    position = {m: i for i, m in enumerate(order)}
    up = [(m, t) for m in order for t, _ in package_imports(m)
          if t in position and position[t] > position[m] and (m, t) not in ALLOWED_UP]
    assert not up, f"imports up the module map (move the code, or the module in the map): {up}"


def test_no_import_cycle_at_import_time():
    modules = [p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"]
    graph = {m: {t for t, at_import in package_imports(m) if at_import} for m in modules}
    done, path = set(), []

    def visit(m: str) -> None:
        assert m not in path, f"import cycle: {' -> '.join(path[path.index(m):] + [m])}"
        if m in done:
            return
        path.append(m)
        for t in sorted(graph[m]):
            visit(t)
        path.pop()
        done.add(m)

    for m in sorted(modules):
        visit(m)


def test_every_module_stays_near_four_hundred_lines():
    long = {p.stem: n for p in PACKAGE.glob("*.py") if (n := len(p.read_text().splitlines())) > 410}
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
    files = [*PACKAGE.glob("*.py"), *(ROOT / "scripts").glob("*.py")]
    crowded = {name: n for path in files for name, n in parameter_counts(path).items() if n > 7}
    assert not crowded, f"functions with more than seven parameters (group them in an options dataclass): {crowded}"
    heads = parameter_counts(PACKAGE / "aggregation.py")  # make_head(name, dim, layout, **options): three
    assert [n for name, n in heads.items() if name.endswith(" make_head")] == [3], "the count itself is wrong"
