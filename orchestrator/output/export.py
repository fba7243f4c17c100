"""Session logs out of the audit database as JSON (for tools) and Markdown (for people)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.audit import AuditStore

__all__ = ["render_json", "render_markdown", "write_exports"]


def render_json(log: dict[str, Any]) -> str:
    """Render the full log as JSON: session metadata, messages, tool usage and events."""
    return json.dumps(log, indent=2, ensure_ascii=False, default=str) + "\n"


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(log: dict[str, Any]) -> str:
    """Render a readable transcript: turns in order, each with its tool calls and errors."""
    session = log["session"]
    lines = [
        f"# Heist session {session['session_id']}",
        "",
        f"- status: {session['status']}",
        f"- started: {session['start_time']}",
        f"- ended: {session.get('end_time') or '-'}",
        f"- turns: {session['num_turns']}",
        f"- strategy: {session.get('strategy') or '-'}, seed: {session.get('seed')}",
        f"- model: {session.get('model') or '-'}",
    ]
    if session.get("error"):
        lines.append(f"- error: {session['error']}")
    lines += ["", "## Transcript", ""]
    tools_by_turn: dict[int, list[dict[str, Any]]] = {}
    for row in log["tool_usage"]:
        tools_by_turn.setdefault(row["turn_id"], []).append(row)
    events_by_turn: dict[int | None, list[dict[str, Any]]] = {}
    for row in log["events"]:
        events_by_turn.setdefault(row["turn_id"], []).append(row)
    for message in log["messages"]:
        turn = message["turn_id"]
        lines.append(f"### Turn {turn}: {message['agent_name']} ({message['agent_role']})")
        lines += ["", message["message"], ""]
        for row in tools_by_turn.get(turn, []):
            outcome = "ok" if row["success"] else f"FAILED ({row['status_code']})"
            lines.append(
                f"- tool `{row['tool_name']}.{row['operation']}` {row['tool_params']} -> {outcome}: "
                f"{_cell(row['tool_result'])[:300]}"
            )
        for row in events_by_turn.get(turn, []):
            lines.append(f"- event {row['service']}.{row['operation']} {row['status_code']}: {_cell(row['detail'])}")
        lines.append("")
    lines += [
        "## Events",
        "",
        "| time | turn | service | operation | status | latency ms | detail |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in log["events"]:
        lines.append(
            f"| {row['timestamp']} | {_cell(row['turn_id'])} | {row['service']} | {row['operation']} | "
            f"{row['status_code']} | {_cell(row['latency_ms'])} | {_cell(row['detail'])} |"
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
