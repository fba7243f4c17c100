"""docs/configuration.md and the tables in docs/cli.md are what docs/generate.py makes of the code today."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel

from heist_common.config import HeistConfig
from heist_common.exit_codes import ExitCode
from heist_common.layout import REPO_ROOT

GENERATOR = REPO_ROOT / "docs" / "generate.py"
GENERATED = ("configuration.md", "cli.md")


def check(docs: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GENERATOR), "--check", "--docs", str(docs)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def copy_of_docs(tmp_path: Path) -> Path:
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in GENERATED:
        shutil.copy(REPO_ROOT / "docs" / name, docs / name)
    return docs


def test_generated_docs_are_up_to_date():
    result = check(REPO_ROOT / "docs")
    assert result.returncode == 0, f"run `make docs`:\n{result.stderr}"


def test_check_fails_naming_a_stale_configuration_page(tmp_path):
    docs = copy_of_docs(tmp_path)
    page = docs / "configuration.md"
    row = next(line for line in page.read_text().splitlines() if line.startswith("| `llm.max_tokens` |"))
    page.write_text(page.read_text().replace(row, row.replace("`256`", "`60`")))
    result = check(docs)
    assert result.returncode == 1
    assert f"{page} is stale" in result.stderr and "cli.md" not in result.stderr


def test_check_fails_naming_a_stale_table_in_cli_md_but_not_its_prose(tmp_path):
    docs = copy_of_docs(tmp_path)
    page = docs / "cli.md"
    text = page.read_text()
    page.write_text(text.replace("# The command line", "# The command line (edited by hand)"))
    assert check(docs).returncode == 0  # the prose is the author's
    page.write_text(text.replace("| 6 | `UNHEALTHY` |", "| 2 | `UNHEALTHY` |"))
    result = check(docs)
    assert result.returncode == 1
    assert f"{page} is stale" in result.stderr and "configuration.md" not in result.stderr


def test_check_fails_when_a_generated_page_is_missing(tmp_path):
    docs = copy_of_docs(tmp_path)
    (docs / "configuration.md").unlink()
    result = check(docs)
    assert result.returncode == 1 and "configuration.md is stale" in result.stderr


def sections(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every field of the config, dotted (``llm.max_tokens``, ``agents[].name``), with its FieldInfo."""
    found = {}
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        found[key] = field
        annotation = field.annotation
        inner, suffix = annotation, ""
        if get_origin(annotation) is dict:
            inner, suffix = get_args(annotation)[1], ".<name>"
        elif get_origin(annotation) is tuple:
            inner, suffix = get_args(annotation)[0], "[]"
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            found.update(sections(inner, f"{key}{suffix}."))
    return found


def test_every_config_field_has_a_description_and_a_row_with_the_code_default():
    page = (REPO_ROOT / "docs" / "configuration.md").read_text()
    fields = sections(HeistConfig)
    assert len(fields) > 60
    for key, field in fields.items():
        assert field.description, f"{key} has no Field(description=...) in heist_common/config.py"
        assert f"| `{key}` |" in page, key
    # The example: the code's defaults, with the shipped file's values beside them.
    prompt_style = next(line for line in page.splitlines() if line.startswith("| `llm.prompt_style` |"))
    assert prompt_style.split(" | ")[2:4] == ["`chat`", "`transcript`"]
    max_tokens = next(line for line in page.splitlines() if line.startswith("| `llm.max_tokens` |"))
    assert max_tokens.split(" | ")[2:4] == ["`256`", "`60`"]


def test_the_exit_code_table_lists_every_code():
    page = (REPO_ROOT / "docs" / "cli.md").read_text()
    for code in ExitCode:
        assert f"| {int(code)} | `{code.name}` |" in page
