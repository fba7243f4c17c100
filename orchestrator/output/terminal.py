"""Text for a terminal: aligned tables, and ``orchestrator show``'s transcript (not Markdown: read, not rendered).

Why apart from ``export``: the Markdown file escapes every character Markdown
would act on, so that a viewer shows the model's words literally; on a terminal
those backslashes and ``&lt;`` are noise. Here text is wrapped to the width
and shown as written, with control characters made visible (the caller's
``visible``: ``orchestrator.cli.printable``) so that the terminal never obeys them.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from heist_common.audit.tokens import TokenTotals

__all__ = ["render_transcript", "table"]

RESULT_CHARS = 300
"""How much of a tool result the transcript shows (``export`` has it whole)."""


def table(header: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[str] = ()) -> list[str]:
    """Lines of a table whose columns are as wide as their widest cell; columns named in ``right`` align right.

    The last column is not padded (no trailing spaces), whatever its alignment.
    """
    cells = [[("-" if value is None else str(value)).replace("\n", " ") for value in row] for row in rows]
    widths = [max([len(name), *(len(row[i]) for row in cells)]) for i, name in enumerate(header)]

    def line(values: Sequence[str]) -> str:
        parts = []
        for i, value in enumerate(values):
            last = i == len(values) - 1
            if header[i] in right:
                parts.append(value.rjust(widths[i]))
            else:
                parts.append(value if last else value.ljust(widths[i]))
        return "  ".join(parts).rstrip()

    return [line(list(header)), *(line(row) for row in cells)]


def _visible(value: Any, visible: Callable[[str], str]) -> Any:
    """``value`` (the log, nested) with every string passed through ``visible``."""
    if isinstance(value, str):
        return visible(value)
    if isinstance(value, dict):
        return {key: _visible(item, visible) for key, item in value.items()}
    if isinstance(value, list):
        return [_visible(item, visible) for item in value]
    return value


def _wrapped(text: str, width: int, indent: str) -> list[str]:
    """Wrap each line of ``text`` to ``width``, indented; blank lines kept, long words broken."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        lines += textwrap.wrap(
            paragraph, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False
        ) or [indent.rstrip()]
    return lines


def render_transcript(log: dict[str, Any], width: int = 100, visible: Callable[[str], str] = str) -> str:
    """Render the session's header, each turn with its tool calls and errors, then the events table.

    ``visible`` makes each text from the audit safe to show (``orchestrator.cli.printable``) before it is
    wrapped, so that escaped control characters count in the width.
    """
    width = max(40, width)
    log = _visible(log, visible)
    session = log["session"]
    planned = session.get("turns_planned")
    turns = f"{session['num_turns']}" + (f" of {planned}" if planned else "")
    facts = [
        ("session", session["session_id"]),
        ("status", session["status"]),
        ("turns", turns),
        ("started", session["start_time"]),
        ("ended", session.get("end_time") or "-"),
        ("strategy", f"{session.get('strategy') or '-'} (seed {session.get('seed')})"),
        ("model", session.get("model") or "-"),
    ]
    tokens = TokenTotals.from_messages(log["messages"])
    if tokens.session.counted_turns:
        facts += [("LLM tokens", tokens.session.describe()), ("by agent", tokens.describe_agents())]
    if session.get("error"):
        facts.append(("error", session["error"]))
    label = max(len(name) for name, _ in facts) + 2
    lines: list[str] = []
    for name, value in facts:
        wrapped = textwrap.wrap(str(value), width - label, break_on_hyphens=False) or [""]
        lines.append(f"{name:<{label}}{wrapped[0]}".rstrip())
        lines += [" " * label + more for more in wrapped[1:]]
    tools: dict[int, list[dict[str, Any]]] = {}
    for row in log["tool_usage"]:
        tools.setdefault(row["turn_id"], []).append(row)
    events: dict[int | None, list[dict[str, Any]]] = {}
    for row in log["events"]:
        events.setdefault(row["turn_id"], []).append(row)
    for message in log["messages"]:
        turn = message["turn_id"]
        status = message.get("status")
        flag = f"  [{status}]" if status and status != "ok" else ""
        lines += ["", f"Turn {turn}  {message['agent_name']} ({message['agent_role']}){flag}"]
        lines += _wrapped(str(message["message"] or ""), width, "  ")
        if message.get("prompt_tokens") is not None:
            estimated = " (estimated)" if message.get("tokens_estimated") else ""
            lines.append(
                f"  tokens: {message['prompt_tokens']} prompt + {message['completion_tokens']} completion{estimated}"
            )
        for row in tools.get(turn, []):
            outcome = "ok" if row["success"] else f"failed {row['status_code']}"
            call = f"tool {row['tool_name']}.{row['operation']} {row['tool_params']} -> {outcome}"
            lines += _wrapped(call, width, "  ")
            result = str(row["tool_result"] or "")
            shown = result if len(result) <= RESULT_CHARS else result[: RESULT_CHARS - 3] + "..."
            lines += _wrapped(shown, width, "      ")
        for row in events.get(turn, []):
            if row["status_code"] != "OK":
                note = f"! {row['service']}.{row['operation']} {row['status_code']}: {row['detail'] or ''}"
                lines += _wrapped(note.rstrip(": "), width, "  ")
    if log["events"]:
        lines += ["", "events"]
        rows = [
            (
                row["timestamp"],
                row["turn_id"],
                row["service"],
                row["operation"],
                row["status_code"],
                "-" if row["latency_ms"] is None else f"{row['latency_ms']:.1f}",
                row["detail"] or "",
            )
            for row in log["events"]
        ]
        header = ("time", "turn", "service", "operation", "status", "ms", "detail")
        body = table(header, rows, right=("turn", "ms"))
        lines += ["  " + line for line in body]
    return "\n".join(lines) + "\n"
