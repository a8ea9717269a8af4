"""The import graph of src/qatflow has no cycles, function-level imports counted.

Read statically with ``ast``: every ``import`` and ``from ... import`` anywhere in a module
(inside functions too) is an edge to the qatflow module it names; imports under
``if TYPE_CHECKING:`` are for type checkers only and are not counted. A package's
``__init__`` is a module like any other; importing a submodule is no edge to its package.

And no module of src/qatflow imports the packages above it (``qatflow_pipelines``,
``qatflow_components``) in any way: the pipeline's commands reach the CLI through entry points.
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


# The layers point one way: library core -> steps -> CLI / components -> pipeline. The
# pipeline package (with the runner and the commands that run it) and the components sit above
# src/qatflow: no module there imports them, not inside a function, not for type checkers.
PIPELINE_PACKAGES = ("qatflow_pipelines", "qatflow_components")


def upward_imports(tree: ast.AST) -> list[str]:
    """The names of ``PIPELINE_PACKAGES`` modules that ``tree`` imports, anywhere in it
    (``import_module("...")`` and ``__import__("...")`` of a literal name included)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.append(node.module or "")
        elif isinstance(node, ast.Call) and node.args and _is_import_call(node.func):
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names.append(first.value)
    return sorted({name for name in names if name.split(".")[0] in PIPELINE_PACKAGES})


def _is_import_call(func: ast.expr) -> bool:
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name in ("import_module", "__import__")


def test_the_library_never_imports_the_pipeline_or_the_components() -> None:
    offenders = {
        module: found
        for module, path in sorted(_modules().items())
        if (found := upward_imports(ast.parse(path.read_text(), str(path))))
    }
    assert not offenders, "src/qatflow imports the layers above it: " + "; ".join(
        f"{module} imports {', '.join(found)}" for module, found in offenders.items()
    )


@pytest.mark.parametrize(
    "code, found",
    [
        ("import qatflow.steps\nfrom qatflow import cli", []),
        (
            "def f():\n    from qatflow_pipelines.qat_int8 import pipeline",
            ["qatflow_pipelines.qat_int8"],
        ),
        (
            "if TYPE_CHECKING:\n    import qatflow_components.evaluate",
            ["qatflow_components.evaluate"],
        ),
        ("import importlib\nimportlib.import_module('qatflow')", []),
        ("importlib.import_module('qatflow_pipelines.cli')", ["qatflow_pipelines.cli"]),
    ],
)
def test_upward_imports(code: str, found: list[str]) -> None:
    assert upward_imports(ast.parse(code)) == found


def test_importing_the_library_loads_no_pipeline() -> None:
    modules = ["qatflow.steps", "qatflow.cli", "qatflow.cluster", "qatflow.images"]
    code = f"import sys; import {', '.join(modules)}; " + (
        f"print([m for m in sys.modules if m.split('.')[0] in {PIPELINE_PACKAGES}])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
