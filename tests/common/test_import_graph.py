"""No import cycles among our modules, counting every import: module level, in functions, under TYPE_CHECKING.

Why every import: a cycle hidden in a function or behind TYPE_CHECKING still
means two modules that cannot be read (or moved) apart. The parent package a
submodule import runs implicitly is not an edge: that is how packages work.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OUR_PACKAGES = ("heist_common", "orchestrator", "servers")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Map each module of ``packages`` under ``root`` to the modules of ours it imports."""
    files = {module_name(root, path): path for package in packages for path in (root / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            for target in targets:
                while target and target not in files:  # `import a.b.c` of a module: the longest name that is ours
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
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


def test_our_modules_import_each_other_without_cycles() -> None:
    graph = import_graph(REPO, OUR_PACKAGES)
    assert len(graph) > 50, "the walk found too few modules to mean anything"
    assert graph["orchestrator.session.runner"], "edges were found"
    assert cycles(graph) == []


def test_packages_are_layered_without_cycles() -> None:
    """Folder by folder too (``orchestrator.tools`` -> ``mesh`` -> ``llm`` -> ``turn`` -> ``session``): no loops."""
    packages: dict[str, set[str]] = {}
    for module, targets in import_graph(REPO, OUR_PACKAGES).items():
        package = ".".join(module.split(".")[:2])
        packages.setdefault(package, set()).update(
            ".".join(target.split(".")[:2]) for target in targets if ".".join(target.split(".")[:2]) != package
        )
    assert {"orchestrator.turn", "orchestrator.session", "servers.runtime", "servers.memory"} <= set(packages)
    assert cycles(packages) == []


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # a lazy import inside a function closes the circle
        ({"pkg/a.py": "import pkg.b\n", "pkg/b.py": "def f():\n    from pkg import a\n"}, [["pkg.a", "pkg.b"]]),
        # TYPE_CHECKING imports count, relative ones resolve
        (
            {
                "pkg/a.py": "from .b import thing\n",
                "pkg/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub.c import X\n",
                "pkg/sub/__init__.py": "",
                "pkg/sub/c.py": "from ..a import y\n",
            },
            [["pkg.a", "pkg.b", "pkg.sub.c"]],
        ),
        # a chain is not a cycle
        ({"pkg/a.py": "import pkg.b\n", "pkg/b.py": "import json\n"}, []),
    ],
)
def test_the_cycle_check_can_fail(tmp_path: Path, files: dict[str, str], expected: list[list[str]]) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    for relative, source in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(source)
    assert cycles(import_graph(tmp_path, ("pkg",))) == expected
