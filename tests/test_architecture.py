"""The shape of the package: one-way module dependencies and functions a person can read.

The import graph is built from the source with :mod:`ast` (module-level and function-level
imports alike), so a cycle hidden inside a function still counts. Rules:

- no import cycle between modules of ``vitft_app`` (``vitft_app.ui`` may import the engine; the
  engine never imports ``vitft_app.ui``, the front ends ``cli``/``server``, or ``gradio``);
- no function in ``vitft_app`` longer than :data:`MAX_FUNCTION_LINES` lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "vitft_app"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
#: Longest function allowed (lines from ``def`` to its last statement, decorators excluded).
MAX_FUNCTION_LINES = 120
#: Folders whose functions the length rule does not check yet (the training loop is being split).
LENGTH_EXEMPT = ()
#: Modules that are front ends: the engine must not import them.
FRONT_ENDS = ("vitft_app.cli", "vitft_app.server", "vitft_app.ui")


def module_name(path: Path) -> str:
    """``vitft_app/ui/app.py`` -> ``vitft_app.ui.app``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` names (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` (anywhere in the file).

    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module, else ``pkg``.
    """
    modules = source_files()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = resolve(node, name, is_package)
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    targets.append(candidate if candidate in modules else base)
            for target in targets:
                # The nearest module of the package that the dotted name falls in.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith(PACKAGE):
                    graph[name].add(target)
    return graph


def external_imports(path: Path) -> set[str]:
    """Top-level names of the packages a file imports (``gradio``, ``torch``, ...)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
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
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def is_front_end(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in FRONT_ENDS)


def test_the_import_graph_sees_relative_absolute_and_function_level_imports():
    graph = import_graph()
    assert "vitft_app.config" in graph["vitft_app.runs"]  # from .config import TrainConfig
    assert "vitft_app.ui.train_tab" in graph["vitft_app.ui.app"]  # from . import train_tab (a module)
    assert all(target.startswith(PACKAGE) for targets in graph.values() for target in targets)


def test_cycle_finder_reports_a_cycle_and_ignores_a_chain():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles_inside_the_package():
    cycles = find_cycles(import_graph())
    assert not cycles, f"import cycles (make the dependency one-way): {cycles}"


def test_the_engine_never_imports_a_front_end_or_gradio():
    graph = import_graph()
    wrong = {
        module: sorted(target for target in targets if is_front_end(target))
        for module, targets in graph.items()
        if not is_front_end(module)
    }
    wrong = {module: targets for module, targets in wrong.items() if targets}
    assert not wrong, f"engine modules importing a front end: {wrong}"
    with_gradio = [name for name, path in source_files().items()
                   if not is_front_end(name) and "gradio" in external_imports(path)]
    assert not with_gradio, f"engine modules importing gradio: {with_gradio}"


def function_lengths() -> list[tuple[int, str]]:
    """``(lines, "module:function")`` for every function and method of the package."""
    lengths = []
    for name, path in source_files().items():
        if any(part in LENGTH_EXEMPT for part in path.relative_to(ROOT).with_suffix("").parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths.append((node.end_lineno - node.lineno + 1, f"{name}:{node.name}"))
    return sorted(lengths, reverse=True)


def test_no_function_is_longer_than_the_limit():
    too_long = [(lines, where) for lines, where in function_lengths() if lines > MAX_FUNCTION_LINES]
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (split them): {too_long}"


def test_the_longest_first_order_names_test_files_that_exist(request):
    """``conftest.LONGEST_FIRST`` orders the suite for the xdist workers; a renamed file would
    silently drop back to the end of the run, so every name must still be a test file, and the
    collected tests (whatever the selection) must come in that order."""
    from conftest import LONGEST_FIRST

    tests = Path(__file__).resolve().parent
    assert [name for name in LONGEST_FIRST if not (tests / name).is_file()] == []
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    ranks = [rank.get(item.path.name, len(rank)) for item in request.session.items]
    assert ranks == sorted(ranks)
