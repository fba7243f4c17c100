"""Reading the project's Markdown the way the docs tests need: code blocks, inline code, links, shell commands."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from heist_common.layout import REPO_ROOT

FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
"""Fenced blocks whose lines are commands (an unlabelled block may be output, or a picture: see ``commands``)."""
INLINE_CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.+)$", re.MULTILINE)
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def pages() -> list[Path]:
    """README.md and every page in docs/."""
    return [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Shown:
    """One command as a page shows it: where, and its words (quotes removed, as the shell would)."""

    page: str
    text: str
    words: tuple[str, ...]
    inline: bool = False
    """In a sentence (may name a command without its arguments) rather than in a code block."""


def code_blocks(text: str) -> list[str]:
    """The bodies of the fenced shell code blocks (and unlabelled ones), not YAML or Python."""
    return [body for language, body in FENCE.findall(text) if language.strip() in SHELL_BLOCKS]


def inline_code(text: str) -> list[str]:
    """Inline code spans outside fenced blocks."""
    return INLINE_CODE.findall(FENCE.sub("", text))


def logical_lines(block: str) -> Iterator[str]:
    """Shell lines: continuations joined, a prompt (``$ ``) dropped, lines inside an open quote kept together."""
    pending = ""
    for raw in block.replace("\\\n", " ").splitlines():
        line = raw.removeprefix("$ ") if not pending else raw
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an unclosed quote: a multi-line argument such as `python -c '...'`
            continue
        yield pending
        pending = ""
    if pending:
        yield pending


def simple_commands(line: str) -> Iterator[tuple[str, ...]]:
    """Each simple command of a shell line (split at ``&&``, ``|``, ``;``, ``$(``...), assignments in front dropped.

    A line that is not shell (program output, a picture in an unlabelled block) has no commands, unless it
    names ``orchestrator`` or ``make`` as a word: then it must be shell, and the ValueError says so.
    """
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.commenters = "#"
    lexer.whitespace_split = True
    try:
        tokens = [*lexer, ";"]
    except ValueError as exc:
        if re.search(r"(^|[\s/(])(orchestrator|make) ", line):
            raise ValueError(f"cannot read this shell line ({exc}): {line}") from None
        return
    words: list[str] = []
    for token in tokens:
        if token in SEPARATORS:
            while words and ASSIGNMENT.match(words[0]):
                words.pop(0)
            if words:
                yield tuple(words)
            words = []
        else:
            words.append(token)


def is_command(words: tuple[str, ...], name: str) -> bool:
    """Whether the command is ``name`` (also run by path, as ``.venv/bin/orchestrator``)."""
    return bool(words) and (words[0] == name or words[0].endswith(f"/{name}"))


def shown_commands(name: str) -> list[Shown]:
    """Every ``name ...`` command in the code blocks and inline code of every page."""
    found = []
    for page in pages():
        text = page.read_text(encoding="utf-8")
        relative = page.relative_to(REPO_ROOT).as_posix()
        for block in code_blocks(text):
            for line in logical_lines(block):
                found += [Shown(relative, line, words) for words in simple_commands(line) if is_command(words, name)]
        for span in inline_code(text):
            if span.startswith(f"{name} "):
                # `orchestrator run [--turns N]`: an optional part, shown with its brackets, must parse too.
                words = tuple(shlex.split(span.replace("[", " ").replace("]", " ")))
                found.append(Shown(relative, span, words, inline=True))
    return found


def links(page: Path) -> list[str]:
    """Every link target of a page, images included."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return [first or second for first, second in LINK.findall(text)]


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings (lowercase, punctuation dropped, spaces as hyphens)."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found
