"""Session logs out of the audit database as JSON (for tools) and Markdown (for people)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from heist_common.audit.tokens import TokenTotals
from orchestrator.output.atomic import write_atomically
from orchestrator.output.report import render_report, report_path
from orchestrator.output.text import markdown_text

__all__ = ["SessionFiles", "render_json", "render_markdown", "write_session_files"]


def render_json(log: dict[str, Any]) -> str:
    """Render the full log as JSON: session metadata, messages, tool usage and events."""
    return json.dumps(log, indent=2, ensure_ascii=False, default=str) + "\n"


def render_markdown(log: dict[str, Any]) -> str:
    """Render a readable transcript: turns in order, each with its tool calls and errors.

    Every text from the audit is escaped (``markdown_text``), so the model's
    words render literally in any Markdown viewer, never as HTML, a link or an
    image. (``orchestrator show`` is ``output.terminal``'s view, not this file.)
    """

    def text(value: object) -> str:
        """Escape a few words that stand in the middle of a line."""
        return markdown_text("" if value is None else str(value), inline=True)

    def cell(value: object) -> str:
        """Escape a value for one line: a list item, a table cell (where "|" would end the cell)."""
        return markdown_text(("" if value is None else str(value)).replace("\n", " "), inline=True)

    session = log["session"]
    lines = [
        f"# Heist session {text(session['session_id'])}",
        "",
        f"- status: {text(session['status'])}",
        f"- started: {text(session['start_time'])}",
        f"- ended: {text(session.get('end_time') or '-')}",
        f"- turns: {text(session['num_turns'])}",
        f"- strategy: {text(session.get('strategy') or '-')}, seed: {text(session.get('seed'))}",
        f"- model: {text(session.get('model') or '-')}",
    ]
    if session.get("error"):
        lines.append(f"- error: {cell(session['error'])}")
    tokens = TokenTotals.from_messages(log["messages"])
    if tokens.session.counted_turns:
        lines.append(f"- LLM tokens: {text(tokens.session.describe())}")
        lines.append(f"- LLM tokens by agent: {cell(tokens.describe_agents())}")
    lines += ["", "## Transcript", ""]
    tools_by_turn: dict[int, list[dict[str, Any]]] = {}
    for row in log["tool_usage"]:
        tools_by_turn.setdefault(row["turn_id"], []).append(row)
    events_by_turn: dict[int | None, list[dict[str, Any]]] = {}
    for row in log["events"]:
        events_by_turn.setdefault(row["turn_id"], []).append(row)
    for message in log["messages"]:
        turn = message["turn_id"]
        lines.append(f"### Turn {turn}: {text(message['agent_name'])} ({text(message['agent_role'])})")
        said = str(message["message"] or "")
        lines += ["", markdown_text(said), ""]
        if message.get("prompt_tokens") is not None:
            estimated = " (estimated)" if message.get("tokens_estimated") else ""
            lines.append(
                f"- tokens: {text(message['prompt_tokens'])} prompt + {text(message['completion_tokens'])} "
                f"completion{estimated}"
            )
        for row in tools_by_turn.get(turn, []):
            outcome = "ok" if row["success"] else f"FAILED ({text(row['status_code'])})"
            result = str(row["tool_result"] or "")
            lines.append(
                f"- tool {text(row['tool_name'])}.{text(row['operation'])} {cell(row['tool_params'])} -> {outcome}: "
                f"{cell(result[:300])}"
            )
        for row in events_by_turn.get(turn, []):
            lines.append(
                f"- event {text(row['service'])}.{text(row['operation'])} {text(row['status_code'])}: "
                f"{cell(row['detail'])}"
            )
        lines.append("")
    lines += [
        "## Events",
        "",
        "| time | turn | service | operation | status | latency ms | detail |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in log["events"]:
        lines.append(
            "| "
            + " | ".join(
                cell(row[key])
                for key in ("timestamp", "turn_id", "service", "operation", "status_code", "latency_ms", "detail")
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


@dataclass
class SessionFiles:
    """What ``write_session_files`` left: the files written whole, and why the others were not written."""

    written: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)
    """Path that was not written -> the reason (``No space left on device``)."""

    def describe_failures(self) -> str:
        """One line for the session's error: which files, and why."""
        return "; ".join(f"{path.name} not written ({reason})" for path, reason in self.failed.items())


def write_session_files(log: dict[str, Any], out_dir: Path) -> SessionFiles:
    """Write ``<session>.json``, ``<session>.md`` and the HTML report into ``out_dir``, each whole or not at all.

    One file failing does not stop the others (a short Markdown log may fit
    where the report does not); every failure is returned with its reason.
    """
    session_id = str(log["session"]["session_id"])
    renderers: list[tuple[Path, Callable[[dict[str, Any]], str]]] = [
        (out_dir / f"{session_id}.json", render_json),
        (out_dir / f"{session_id}.md", render_markdown),
        (report_path(out_dir, session_id), render_report),
    ]
    files = SessionFiles()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        files.failed = {path: _reason(exc) for path, _ in renderers}
        return files
    for path, render in renderers:
        try:
            write_atomically(path, render(log))
        except OSError as exc:
            files.failed[path] = _reason(exc)
        else:
            files.written.append(path)
    return files


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
