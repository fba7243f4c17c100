"""The inline tool-call syntax, ``[TOOL:<tool>:<argument>]``, in one place: how it is written, found and shown.

Models without native function calling write tool calls as text. The prompts
teach this syntax, the grammars constrain it, the turn opens it for the model
and the tool caller finds, runs and replaces it; all of them spell it here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "CLOSE",
    "OPEN",
    "OPENING",
    "PATTERN",
    "SHOWN",
    "InlineToolCall",
    "close",
    "find",
    "opening",
    "shown",
    "written",
]

OPEN = "[TOOL:"
"""What every marker starts with (a grammar's literal too)."""
CLOSE = "]"
"""What ends a marker's argument."""
PATTERN = re.compile(r"\[TOOL:\s*([A-Za-z_][\w-]*)\s*:\s*([^\]\n]*?)\s*\]")
"""A whole marker, ``[TOOL:calculator:(120-15)*3]``: the tool's name, then the argument up to the closing bracket."""
OPENING = re.compile(r"\[TOOL:\s*([A-Za-z_][\w-]*)\s*:")
"""The opening of a marker, closed or not."""
SHOWN = re.compile(r"\[[\w-]+: .*? -> .*\]")
"""A marker after the tool caller replaced it by its outcome: ``[tool: argument -> outcome]``."""


@dataclass(frozen=True, slots=True)
class InlineToolCall:
    """One marker found in a reply."""

    marker: str
    tool: str
    argument: str


def opening(tool: str) -> str:
    """``[TOOL:<tool>:``: what a turn writes for the model to continue with an argument."""
    return f"{OPEN}{tool}:"


def written(tool: str, argument: str) -> str:
    """Write a whole marker as a model should (for prompts and examples)."""
    return f"{opening(tool)}{argument}{CLOSE}"


def close(text: str) -> str:
    """Close a marker whose argument ``text`` ended before its bracket (the line ran out)."""
    return text if CLOSE in text else text + CLOSE


def find(text: str) -> list[InlineToolCall]:
    """Every whole marker in ``text``, in order."""
    return [InlineToolCall(m.group(0), m.group(1), m.group(2)) for m in PATTERN.finditer(text)]


def shown(tool: str, argument: str, outcome: str) -> str:
    """Render what replaces a marker once it ran: the call and its outcome, as ``SHOWN`` matches."""
    return f"[{tool}: {argument} -> {outcome}]"
