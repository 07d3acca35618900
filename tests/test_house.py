"""The house's shape, read from the code with ``ast``: no import circles (imports inside functions count), the
layers and the pipeline's wings import one way, and no module is past the line bound."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ovsam", "pipeline", "jobs", "schemas")
# pipeline's wings, lowest first: each imports only the wings before it (pipeline/__init__.py says the same).
WINGS = ("inputs", "annotate", "training", "evaluation", "export", "serving")
MAX_LINES = 520


def find_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root/<package>``."""
    found = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (module level, functions, ``TYPE_CHECKING``).
    ``from a import b`` counts as importing ``a.b`` when that is a module, else ``a``; a module importing its own
    package does not count (the package is being imported already)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                module = ".".join(parts + ([module] if module else []))
            targets = [f"{module}.{alias.name}" for alias in node.names] + [module]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                out.add(target)
    return out


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> tuple[dict[str, set[str]], dict[str, Path]]:
    known = find_modules(root, packages)
    return {name: imported_modules(name, path, known) for name, path in known.items()}, known


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in graph:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        circles.append(sorted(component))
    return circles


def describe(circles: list[list[str]], files: dict[str, Path], root: Path) -> str:
    return "\n".join("import circle: " + " <-> ".join(str(files[m].relative_to(root)) for m in c) for c in circles)


def test_no_import_circles():
    graph, files = import_graph(ROOT)
    circles = import_circles(graph)
    assert not circles, describe(circles, files, ROOT)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_circle_through_an_import_inside_a_function_is_found_and_named(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg import a\n",  # a package importing its own modules is no circle
        "pkg/a.py": "from pkg.b import helper\n",
        "pkg/b.py": "def helper():\n    from . import c\n    return c\n",
        "pkg/c.py": "import pkg.a\n",
        "pkg/d.py": "from pkg.a import *\n",  # imports into the circle, is not part of it
    })
    graph, files = import_graph(tmp_path, ("pkg",))
    circles = import_circles(graph)
    assert circles == [["pkg.a", "pkg.b", "pkg.c"]]
    message = describe(circles, files, tmp_path)
    assert message == "import circle: pkg/a.py <-> pkg/b.py <-> pkg/c.py"

    (tmp_path / "pkg/c.py").write_text("import json\n")
    assert import_circles(import_graph(tmp_path, ("pkg",))[0]) == []


def test_two_module_circle_and_relative_parent_imports(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "",
        "pkg/low/x.py": "if False:\n    from ..high.y import Y\n",
        "pkg/high/__init__.py": "",
        "pkg/high/y.py": "from pkg.low import x\nY = 1\n",
    })
    graph, _ = import_graph(tmp_path, ("pkg",))
    assert import_circles(graph) == [["pkg.high.y", "pkg.low.x"]]


def _wing(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 1 and parts[1] in WINGS else None


def test_layers_and_wings_import_one_way():
    graph, files = import_graph(ROOT)
    wrong = []
    for module, deps in graph.items():
        layer = module.split(".")[0]
        for dep in deps:
            dep_layer = dep.split(".")[0]
            if layer in ("ovsam", "schemas") and dep_layer in ("pipeline", "jobs"):
                wrong.append(f"{module} -> {dep}: ovsam and schemas import nothing of pipeline or jobs")
            if layer == "pipeline" and dep_layer == "jobs":
                wrong.append(f"{module} -> {dep}: pipeline never imports jobs")
            if layer == "pipeline" and module != "pipeline" and _wing(module) is None:
                wrong.append(f"{module}: every pipeline module belongs to a wing {WINGS}")
            wing, dep_wing = _wing(module), _wing(dep)
            if wing and dep_wing and WINGS.index(dep_wing) > WINGS.index(wing):
                wrong.append(f"{module} -> {dep}: the {wing} wing imports only the wings below it")
    assert not wrong, "\n".join(sorted(wrong))
    assert set(WINGS) == {p.name for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").exists()}


def test_each_wing_says_what_it_holds_and_may_import():
    for wing in WINGS:
        doc = ast.get_docstring(ast.parse((ROOT / "pipeline" / wing / "__init__.py").read_text()))
        assert doc and len(doc) > 80, f"pipeline/{wing}/__init__.py needs a docstring"
    doc = ast.get_docstring(ast.parse((ROOT / "pipeline" / "__init__.py").read_text()))
    positions = [doc.index(f"pipeline.{wing}`") for wing in WINGS]
    assert positions == sorted(positions), "pipeline/__init__.py lists the wings lowest first"


@pytest.mark.parametrize("package", ["ovsam", "pipeline", "jobs", "schemas"])
def test_no_file_past_the_line_bound(package):
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / package).rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"past {MAX_LINES} lines: {long}"
