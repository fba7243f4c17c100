"""The layering the code relies on: shared code in heist_common, and no tool named outside its own servicer."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from heist_common.layout import REPO_ROOT
from tests.support.config import TOOLS

PACKAGES = ("heist_common", "servers", "orchestrator")
FORBIDDEN_IMPORTS = {
    "heist_common": ("servers", "orchestrator"),
    "orchestrator": ("servers",),
    "servers": ("orchestrator",),
}
BRIDGES = ("servers/orchestrator.py",)
"""The one module that may cross: the orchestrator service serves heists (``orchestrator.service``) on the
common server bootstrap (``servers.runtime``)."""


def modules(package: str) -> Iterator[Path]:
    yield from sorted((REPO_ROOT / package).rglob("*.py"))


def imported(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_crosses_the_layers(package: str) -> None:
    crossing = [
        f"{path.relative_to(REPO_ROOT)} imports {name}"
        for path in modules(package)
        if str(path.relative_to(REPO_ROOT)) not in BRIDGES
        for name in imported(path)
        if name.split(".")[0] in FORBIDDEN_IMPORTS[package]
    ]
    assert crossing == []


def code_strings(path: Path) -> Iterator[tuple[int, str]]:
    """String literals and identifiers in code; docstrings (bare string statements) left out: they may use examples."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value
        elif isinstance(node, ast.Name):
            yield node.lineno, node.id
        elif isinstance(node, ast.Attribute):
            yield node.lineno, node.attr


def test_no_code_outside_a_tools_own_servicer_names_a_tool() -> None:
    assert TOOLS, "the shipped config has tool services"
    found = []
    for package in PACKAGES:
        for path in modules(package):
            if package == "servers" and Path(path.relative_to(REPO_ROOT / "servers").parts[0]).stem in TOOLS:
                continue  # a tool's own servicer (``servers/<tool>.py``) or package (``servers/<tool>/``)
            found += [
                f"{path.relative_to(REPO_ROOT)}:{line}: {text!r}"
                for line, text in code_strings(path)
                if any(tool in text for tool in TOOLS)
            ]
    assert found == []


def test_the_check_above_sees_tool_names_in_code(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(f'"""Mentions {TOOLS[0]} in a docstring only."""\nNAME = "{TOOLS[0]}"\n')
    assert [text for _, text in code_strings(sample) if TOOLS[0] in text] == [TOOLS[0]]
