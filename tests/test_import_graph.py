"""The packages' import graph, read from the source: no import cycle anywhere (a deferred import
inside a function hides a cycle from Python, not from a reader, so every import statement counts),
the shared contract imports nothing else, the shared store only the contract, and neither side
imports the other (the operator's image installs no runner code)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"disp_api": ROOT / "api" / "disp_api", "disp_store": ROOT / "store" / "disp_store",
            "disp_runner": ROOT / "runner" / "disp_runner", "disp_operator": ROOT / "operator" / "disp_operator"}
# Which packages each may import (itself always).
MAY_IMPORT = {"disp_api": set(), "disp_store": {"disp_api"}, "disp_runner": {"disp_api", "disp_store"},
              "disp_operator": {"disp_api", "disp_store"}}


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


def crossings(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a package that MAY_IMPORT does not allow its importer."""
    return sorted(f"{name} -> {target}" for name, targets in graph.items() for target in targets
                  if target.split(".")[0] not in MAY_IMPORT[name.split(".")[0]] | {name.split(".")[0]})


def test_the_contract_and_the_store_import_neither_side_and_the_sides_not_each_other():
    assert crossings(import_graph(PACKAGES)) == []


def test_the_layering_check_sees_a_crossing(tmp_path):
    """The check above reads every import statement: a deferred one inside a function counts."""
    for package in ("disp_store", "disp_runner"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "disp_store" / "s3.py").write_text("def later():\n    from disp_runner.cli import main\n")
    (tmp_path / "disp_runner" / "cli.py").write_text("main = 1\n")
    graph = import_graph({"disp_store": tmp_path / "disp_store", "disp_runner": tmp_path / "disp_runner"})
    assert crossings(graph) == ["disp_store.s3 -> disp_runner.cli"]


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


# What a stage may not reach: where the run's outputs live (the pipeline publishes what a stage
# writes) and the store (the pipeline resolves the files the spec names before the stage runs).
STAGE_MAY_NOT_IMPORT = ("disp_store", "disp_runner.pipeline.storage")


def stage_reaches(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{name} -> {target}" for name, targets in graph.items() if name.startswith("disp_runner.stages")
                  for target in targets if target.startswith(STAGE_MAY_NOT_IMPORT))


def test_stages_are_given_their_inputs_and_reach_no_storage():
    assert stage_reaches(import_graph(PACKAGES)) == []


def test_the_stage_check_sees_a_stage_that_opens_the_store(tmp_path):
    for package in ("disp_store", "disp_runner", "disp_runner/stages"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "disp_store" / "s3.py").write_text("S3Store = object\n")
    (tmp_path / "disp_runner" / "stages" / "relabel.py").write_text(
        "def run():\n    from disp_store.s3 import S3Store\n    return S3Store\n")
    graph = import_graph({"disp_store": tmp_path / "disp_store", "disp_runner": tmp_path / "disp_runner"})
    assert stage_reaches(graph) == ["disp_runner.stages.relabel -> disp_store.s3"]
