"""Every `orchestrator ...` and `make ...` command the README and docs/ show is one the code accepts.

A command in the docs that the CLI no longer takes (a renamed option, a removed
make target) is a newcomer's first failure; these tests make it the author's.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex

import pytest

from heist_common.layout import REPO_ROOT
from orchestrator import cli
from tests.docs.markdown import Shown, shown_commands

MAKEFILE = (REPO_ROOT / "Makefile").read_text()
TARGETS = set(re.findall(r"^([a-z][a-z0-9_-]*)\s*:(?!=)", MAKEFILE, re.MULTILINE))
VARIABLES = set(re.findall(r"^([A-Z][A-Z0-9_]*)\s*[?:]?=", MAKEFILE, re.MULTILINE))
ORCHESTRATOR = shown_commands("orchestrator")
MAKE = shown_commands("make")


PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*$")
"""``SESSION``, ``N``, ``FILE``: a value the reader fills in, which must parse like a real one."""
SAMPLE_VALUE = "1"
"""What a placeholder stands for in the check: a session ID, a number, a path alike."""


def parse_error(argv: list[str]) -> str | None:
    """What the orchestrator's own parser says about ``argv`` (None: accepted); placeholders get a sample value."""
    argv = [SAMPLE_VALUE if PLACEHOLDER.match(word) else word for word in argv]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            cli._parser().parse_args(argv)
    except SystemExit as exc:
        return None if exc.code == 0 else stderr.getvalue().strip().splitlines()[-1]
    return None


def only_arguments_missing(error: str) -> bool:
    """A reference in prose (`orchestrator resume`) names a command without its arguments: that is fine."""
    return "the following arguments are required" in error


def test_the_docs_show_commands_of_both_kinds():
    pages = {shown.page for shown in ORCHESTRATOR + MAKE}
    assert {"README.md", "docs/cli.md"} <= pages
    assert len(ORCHESTRATOR) >= 20 and len(MAKE) >= 15


@pytest.mark.parametrize("shown", ORCHESTRATOR, ids=lambda shown: f"{shown.page}: {shown.text[:60]}")
def test_orchestrator_command_is_accepted_by_the_cli(shown: Shown):
    error = parse_error(list(shown.words[1:]))
    if error is not None and shown.inline:
        assert only_arguments_missing(error), f"{shown.page} mentions `{shown.text}`, which the CLI refuses: {error}"
    else:
        assert error is None, f"{shown.page} shows `{shown.text}`, which the CLI refuses: {error}"


@pytest.mark.parametrize("shown", MAKE, ids=lambda shown: f"{shown.page}: {shown.text[:60]}")
def test_make_command_names_real_targets_and_variables(shown: Shown):
    arguments = shown.words[1:]
    targets = [word for word in arguments if "=" not in word and not word.startswith("-")]
    assignments = dict(word.split("=", 1) for word in arguments if "=" in word)
    assert targets or not arguments, f"{shown.page}: `{shown.text}` names no target"
    assert set(targets) <= TARGETS, f"{shown.page}: `{shown.text}`: no such target {set(targets) - TARGETS}"
    assert set(assignments) <= VARIABLES, f"{shown.page}: `{shown.text}`: the Makefile has no {set(assignments)}"
    if "ARGS" in assignments and "run" in targets:  # `make run ARGS="..."` passes them to `orchestrator run`
        error = parse_error(["run", *shlex.split(assignments["ARGS"])])
        assert error is None, f"{shown.page}: `{shown.text}`: orchestrator run refuses ARGS: {error}"


def test_the_checks_catch_a_wrong_command():
    assert parse_error(["run", "--turnz", "3"]) is not None
    assert parse_error(["run", "--seed", "seven"]) is not None
    assert parse_error(["export", "S", "--format", "pdf"]) is not None
    assert parse_error(["report", "SESSION", "--out", "FILE"]) is None
    missing = parse_error(["show"])
    assert missing is not None and only_arguments_missing(missing)
    unknown = parse_error(["replay", "SESSION"])
    assert unknown is not None and not only_arguments_missing(unknown)
    assert "serve" in TARGETS and "docs" in TARGETS and "servce" not in TARGETS
    assert {"CONFIG", "LLM", "ARGS", "BENCH_ONLY"} <= VARIABLES
