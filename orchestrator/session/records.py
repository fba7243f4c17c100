"""What ``--json`` prints: one JSON object per line, with the fields ``SHAPES`` declares (docs/cli.md's tables).

Why declared once here: the tables in docs/cli.md are generated from ``SHAPES``
(``make docs``) and every record is checked against it when built, so a field
cannot be added, renamed or dropped without the documentation following.
Values are as the audit holds them: a turn's message and tool results whole,
model text unescaped (JSON escapes what needs escaping).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from heist_common.audit.tokens import TokenCount
    from orchestrator.mesh.clients import HealthResult
    from orchestrator.session.runner import SessionResult
    from orchestrator.turn.turn import Turn

__all__ = ["SHAPES", "dumps", "health_record", "session_record", "summary_record", "turn_record"]

SHAPES: dict[str, dict[str, str]] = {
    "turn": {
        "type": "`turn`",
        "session_id": "the session",
        "turn_id": "1, 2, ... (a resumed session goes on from where it stopped)",
        "agent": "the agent's name",
        "role": "the agent's role",
        "status": "`ok`, `llm_error` or `empty`",
        "message": "what the agent said, whole (the audit's `messages.message`)",
        "tool_calls": "list of `{tool, operation, params, success, status_code, result, latency_ms}`, one per "
        "`tool_usage` row of the turn",
        "errors": "list of `{service, operation, status_code, detail}`: the turn's failed calls and empty replies "
        "(its `events` rows)",
        "llm_ms": "time spent waiting for the model",
        "total_ms": "the whole turn, audit write included",
        "trace_id": "the turn's trace (OpenTelemetry), as in the audit",
    },
    "summary": {
        "type": "`summary`",
        "session_id": "the session",
        "status": "`completed`, `degraded`, `failed` or `interrupted`",
        "exit_code": "the command's exit code (see [Exit codes](#exit-codes))",
        "turns": "turns played by this run",
        "turns_before": "turns played before this run (a resumed session), else 0",
        "tool_calls_ok": "tool calls that returned a result",
        "tool_calls_failed": "tool calls that failed or were refused",
        "errors": "failed calls and LLM requests, empty replies",
        "empty_turns": "turns whose reply stayed empty",
        "health": "the health check at start: list of `health` objects (below)",
        "degraded": "list of `{service, attempts, code, detail}`: services the crew could not use at all",
        "database": "the audit database (a URL's password as `***`)",
        "logs": "the JSON and Markdown logs written",
        "report": "the HTML report, or null",
        "not_written": "`{path: reason}` of session files that could not be written",
        "settled": "earlier sessions whose end this run recorded",
        "error": "why the session did not complete (URL passwords as `***`), or null",
    },
    "health": {
        "service": "a service name, or `llm`",
        "target": "where it was probed",
        "status": "`SERVING`, `NOT_SERVING`, `UNREACHABLE`, ... (the health table's column)",
        "ok": "whether it can be used (status `SERVING`)",
        "latency_ms": "the probe's round trip",
        "detail": "why it is not usable, else empty",
    },
    "session": {
        "session_id": "the session",
        "status": "`active`, `completed`, `degraded`, `failed` or `interrupted`",
        "num_turns": "turns in the audit",
        "turns_planned": "turns the session was started for (null for sessions older than the column)",
        "start_time": "ISO 8601, UTC",
        "end_time": "ISO 8601, UTC, or null while it runs",
        "strategy": "the turn strategy",
        "seed": "the schedule's seed",
        "model": "the model it ran on",
        "error": "why it did not complete, or null",
        "tokens": "LLM tokens of its turns in all (prompt and completion), or null when none were counted",
        "tokens_estimated": "whether any part of `tokens` is an estimate (null with `tokens`)",
    },
}
"""Each ``--json`` object's fields and what they mean, by record type."""


def dumps(record: Mapping[str, Any]) -> str:
    """One line of JSON (non-ASCII kept as it is; anything else JSON cannot hold as its text)."""
    return json.dumps(record, ensure_ascii=False, default=str, separators=(",", ":"))


def _checked(kind: str, record: dict[str, Any]) -> dict[str, Any]:
    if list(record) != list(SHAPES[kind]):
        raise AssertionError(f"{kind} record fields {list(record)} are not SHAPES[{kind!r}]")
    return record


def turn_record(session_id: str, turn: Turn) -> dict[str, Any]:
    """Describe a turn as it ended."""
    tool_calls = [
        {
            "tool": row.tool_name,
            "operation": row.operation,
            "params": row.tool_params,
            "success": row.success,
            "status_code": row.status_code,
            "result": row.tool_result,
            "latency_ms": row.latency_ms,
        }
        for row in turn.tool_usage
    ]
    errors = [
        {"service": e.service, "operation": e.operation, "status_code": e.status_code, "detail": e.detail}
        for e in turn.events
        if e.status_code != "OK"
    ]
    record = {
        "type": "turn",
        "session_id": session_id,
        "turn_id": turn.turn_id,
        "agent": turn.agent_name,
        "role": turn.agent_role,
        "status": turn.status,
        "message": turn.message,
        "tool_calls": tool_calls,
        "errors": errors,
        "llm_ms": round(turn.llm_ms, 3),
        "total_ms": round(turn.total_ms, 3),
        "trace_id": turn.trace_id,
    }
    return _checked("turn", record)


def health_record(result: HealthResult) -> dict[str, Any]:
    """One row of the health table."""
    record = {
        "service": result.service,
        "target": result.target,
        "status": result.status,
        "ok": result.ok,
        "latency_ms": round(result.latency_ms, 3),
        "detail": result.detail,
    }
    return _checked("health", record)


def summary_record(result: SessionResult, *, database: str, error: str | None) -> dict[str, Any]:
    """Describe the run's end; ``database`` and ``error`` come redacted (the caller's redaction, as on the terminal)."""
    degraded = [
        {"service": s.service, "attempts": s.attempts, "code": s.code, "detail": s.detail} for s in result.unusable
    ]
    record = {
        "type": "summary",
        "session_id": result.session_id,
        "status": result.status,
        "exit_code": int(result.exit_code),
        "turns": len(result.turns),
        "turns_before": result.turns_before,
        "tool_calls_ok": result.tool_calls_ok,
        "tool_calls_failed": result.tool_calls_failed,
        "errors": result.errors,
        "empty_turns": result.empty_turns,
        "health": [health_record(health) for health in result.health],
        "degraded": degraded,
        "database": database,
        "logs": [str(path) for path in result.exports],
        "report": str(result.report) if result.report is not None else None,
        "not_written": {str(path): reason for path, reason in result.export_failures.items()},
        "settled": list(result.settled),
        "error": error,
    }
    return _checked("summary", record)


def session_record(row: Mapping[str, Any], tokens: TokenCount | None) -> dict[str, Any]:
    """Describe a ``sessions`` row of the audit, with the documented fields only, and its token total."""
    record = {name: row.get(name) for name in SHAPES["session"]}
    record["tokens"] = tokens.total if tokens is not None else None
    record["tokens_estimated"] = tokens.estimated if tokens is not None else None
    return _checked("session", record)
