"""The import graph of src/qatflow has no cycles, function-level imports counted.

Read statically with ``ast``: every ``import`` and ``from ... import`` anywhere in a module
(inside functions too) is an edge to the qatflow module it names; imports under
``if TYPE_CHECKING:`` are for type checkers only and are not counted. A package's
``__init__`` is a module like any other; importing a submodule is no edge to its package.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in (SRC / "qatflow").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (n for child in node.orelse for n in _imports_in(child))
            continue
        yield from _imports_in(node)


def _imports_in(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    else:
        yield from _imports(node)


def import_graph() -> dict[str, set[str]]:
    """qatflow module -> the qatflow modules it imports."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        names: list[str] = []
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names += [f"{base}.{alias.name}" for alias in node.names]
        graph[module] = {found for n in names if (found := resolve(n)) not in (None, module)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_graph_sees_the_library() -> None:
    graph = import_graph()
    assert "qatflow.models" in graph["qatflow.steps"]  # a function-level import
    assert "qatflow.runtimes.base" in graph["qatflow.runtimes.dispatch"]
    # Type-only imports are no edges: ranges types its wrapper argument, wrapper calls ranges.
    assert "qatflow.quantization.wrapper" not in graph["qatflow.quantization.ranges"]


def test_import_graph_has_no_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in src/qatflow: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    "graph, cycle",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ],
)
def test_find_cycle(graph: dict[str, set[str]], cycle: list[str] | None) -> None:
    assert find_cycle(graph) == cycle


# The layers point one way: library core -> steps -> CLI / components -> pipeline. Only the
# commands that run or compile the pipeline reach up to it, inside the function that needs it.
PIPELINE_PACKAGES = ("qatflow_pipelines", "qatflow_components")
PIPELINE_RUNNERS = {
    "qatflow.local_run",
    "qatflow.pipeline_compile",
    "qatflow.cli.pipeline",
    "qatflow.cli.cluster",
}


def _pipeline_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    def named(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        return [node.module or ""]

    return [
        node
        for node in _imports(tree)
        if any(name.split(".")[0] in PIPELINE_PACKAGES for name in named(node))
    ]


def test_only_the_runners_import_the_pipeline_and_lazily() -> None:
    for module, path in _modules().items():
        tree = ast.parse(path.read_text(), str(path))
        found = _pipeline_imports(tree)
        assert not found or module in PIPELINE_RUNNERS, f"{module} imports the pipeline"
        top_level = [node for node in found if node in ast.iter_child_nodes(tree)]
        assert not top_level, f"{module} imports the pipeline at import time"


def test_importing_the_library_loads_no_pipeline() -> None:
    modules = ["qatflow.steps", "qatflow.cli", *sorted(PIPELINE_RUNNERS)]
    code = f"import sys; import {', '.join(modules)}; " + (
        f"print([m for m in sys.modules if m.split('.')[0] in {PIPELINE_PACKAGES}])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
