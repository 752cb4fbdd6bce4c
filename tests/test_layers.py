"""The package's modules import one way (facade -> consumers -> engine -> bindings; rendering
below) and never another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import dynbatch

PACKAGE = Path(dynbatch.__file__).parent


def _imports() -> dict[str, list[tuple[str, str]]]:
    """Per module: (imported module, imported name or "") for every relative import, at any
    depth (an import inside a function is an edge too)."""
    graph: dict[str, list[tuple[str, str]]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        edges: list[tuple[str, str]] = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                for alias in node.names:
                    if node.module is None:  # from . import x
                        edges.append((alias.name, ""))
                    else:
                        edges.append((node.module, alias.name))
        graph[path.stem] = edges
    return graph


def test_no_module_imports_another_modules_private_names() -> None:
    offenders = [
        f"{module} imports {name} from {target}"
        for module, edges in _imports().items()
        for target, name in edges
        if name.startswith("_") and target != "__init__"
    ]
    assert not offenders


def test_imports_form_no_cycle() -> None:
    graph = {module: {target for target, _ in edges} for module, edges in _imports().items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done or module not in graph:
            return
        for target in sorted(graph[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_consumers_and_engine_stay_below_the_facade() -> None:
    graph = {module: {target for target, _ in edges} for module, edges in _imports().items()}
    for lower in ("engine", "iteration", "serving", "stats", "stats_data", "metrics", "plots"):
        assert "processor" not in graph[lower], f"{lower} imports the facade"
    for rendering in ("stats", "stats_data", "metrics", "plots"):
        assert not graph[rendering] & {"engine", "iteration", "serving"}, rendering
    assert not graph["iteration"] & {"serving"} and not graph["serving"] & {"iteration"}
