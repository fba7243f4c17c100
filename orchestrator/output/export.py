"""Session logs out of the audit database as JSON (for tools) and Markdown (for people)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.audit import AuditStore
from orchestrator.output.text import markdown_text

__all__ = ["render_json", "render_markdown", "write_exports"]


def render_json(log: dict[str, Any]) -> str:
    """Render the full log as JSON: session metadata, messages, tool usage and events."""
    return json.dumps(log, indent=2, ensure_ascii=False, default=str) + "\n"


def render_markdown(log: dict[str, Any], *, escaped: bool = True) -> str:
    """Render a readable transcript: turns in order, each with its tool calls and errors.

    Every text from the audit is escaped (``markdown_text``), so the model's
    words render literally in any Markdown viewer, never as HTML, a link or an
    image. ``escaped=False`` keeps them as written, for ``orchestrator show``,
    which makes the whole page safe for the terminal instead.
    """

    def text(value: object) -> str:
        """Escape a few words that stand in the middle of a line."""
        raw = "" if value is None else str(value)
        return markdown_text(raw, inline=True) if escaped else raw

    def cell(value: object) -> str:
        """Escape a value for one line: a list item, a table cell (where "|" would end the cell)."""
        line = ("" if value is None else str(value)).replace("\n", " ")
        return markdown_text(line, inline=True) if escaped else line.replace("|", "\\|")

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
        lines += ["", markdown_text(said) if escaped else said, ""]
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


def write_exports(audit: AuditStore, session_id: str, out_dir: Path) -> list[Path]:
    """Write ``<session>.json`` and ``<session>.md`` into ``out_dir``; return both paths."""
    log = audit.read_session_log(session_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{session_id}.json"
    md_path = out_dir / f"{session_id}.md"
    json_path.write_text(render_json(log), encoding="utf-8")
    md_path.write_text(render_markdown(log), encoding="utf-8")
    return [json_path, md_path]
