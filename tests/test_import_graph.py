"""The packages' import graph, read from the source: no import cycle anywhere (a deferred import
inside a function hides a cycle from Python, not from a reader, so every import statement counts),
the shared contract imports neither side, and the operator reaches into the runner only where it
is known to (its S3 client; to go when the store becomes a package of its own)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"disp_api": ROOT / "api" / "disp_api", "disp_runner": ROOT / "runner" / "disp_runner",
            "disp_operator": ROOT / "operator" / "disp_operator"}
# What the operator may import of the runner today, and nothing more.
OPERATOR_USES_OF_RUNNER = {"disp_runner.store.s3"}


def modules(packages: dict[str, Path]) -> dict[str, Path]:
    found = {}
    for package, root in packages.items():
        for path in root.rglob("*.py"):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            found[".".join(p for p in parts if p != "__init__")] = path
    return found


def import_graph(packages: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of these packages it imports, by any import statement in it."""
    known = modules(packages)
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            else:
                continue
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_through_others():
    assert cycles(import_graph(PACKAGES)) == []


def test_the_contract_imports_neither_side_and_the_operator_only_the_runners_s3_client():
    graph = import_graph(PACKAGES)
    contract = {target for name, targets in graph.items() if name.startswith("disp_api") for target in targets}
    assert all(target.startswith("disp_api") for target in contract), sorted(contract)
    operator = {target for name, targets in graph.items() if name.startswith("disp_operator")
                for target in targets if target.startswith("disp_runner")}
    assert operator == OPERATOR_USES_OF_RUNNER


def test_the_check_finds_a_cycle_hidden_in_a_function(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import thing\n")
    (package / "b.py").write_text("thing = 1\n\ndef later():\n    from pkg.c import other\n    return other\n")
    (package / "c.py").write_text("import pkg.a\nother = 2\n")
    assert cycles(import_graph({"pkg": package})) == [["pkg.a", "pkg.b", "pkg.c"]]
    (package / "c.py").write_text("other = 2\n")
    assert cycles(import_graph({"pkg": package})) == []
