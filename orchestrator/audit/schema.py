"""The audit schema: Peewee models with the seed's table and column names, the single source of truth.

``SELECT * FROM messages WHERE session_id = ?`` works as in the seed; ``events``
adds every service error and health result.
"""

from __future__ import annotations

from datetime import UTC, datetime

import peewee

database_proxy = peewee.DatabaseProxy()
"""Models are bound through this proxy, so one process holds one open audit database at a time."""


class SessionStatus:
    """Values of ``sessions.status``."""

    ACTIVE = "active"
    COMPLETED = "completed"
    DEGRADED = "degraded"
    """Every turn was played, but a service the crew needed never worked (``orchestrator.session.runner``)."""
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"
    """Stopped on request (A2A CancelTask on ``orchestrator serve``); not resumable."""


def now_iso() -> str:
    """UTC timestamp as ISO-8601 text: sortable in SQL and unambiguous across machines."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class _BaseModel(peewee.Model):
    class Meta:
        database = database_proxy


class SessionRecord(_BaseModel):
    """One heist run."""

    session_id = peewee.TextField(primary_key=True)
    start_time = peewee.TextField()
    end_time = peewee.TextField(null=True)
    num_turns = peewee.IntegerField(default=0)
    status = peewee.TextField(default=SessionStatus.ACTIVE)
    strategy = peewee.TextField(null=True)
    seed = peewee.BigIntegerField(null=True)  # generated when not given, so a resumed random schedule continues
    model = peewee.TextField(null=True)
    error = peewee.TextField(null=True)
    # For `orchestrator resume` (NULL in sessions written before it existed):
    turns_planned = peewee.IntegerField(null=True)
    pid = peewee.IntegerField(null=True)  # the orchestrator process that owns the session; its writes are fenced on it
    host = peewee.TextField(null=True)  # ... and the machine it runs on
    heartbeat_at = peewee.TextField(null=True)  # last sign of life: start, each committed turn, a resume
    # The OAuth client that started it through `orchestrator serve` (NULL: the CLI); only it sees the task.
    client_id = peewee.TextField(null=True)

    class Meta:  # noqa: D106 - Peewee options
        table_name = "sessions"


class MessageRecord(_BaseModel):
    """What one agent said in one turn (an LLM failure's error text counts as what it said)."""

    id = peewee.AutoField()
    session = peewee.ForeignKeyField(SessionRecord, column_name="session_id", field="session_id", backref="messages")
    turn_id = peewee.IntegerField()
    agent_name = peewee.TextField()
    agent_role = peewee.TextField()
    message = peewee.TextField()
    timestamp = peewee.TextField()
    status = peewee.TextField(default="ok")
    latency_ms = peewee.FloatField(null=True)
    trace_id = peewee.TextField(null=True)  # W3C trace of the turn: grep the server logs for trace=<id>
    timings = peewee.TextField(null=True)  # the turn's timeline as JSON (orchestrator.tracing.timings_json)

    class Meta:  # noqa: D106 - Peewee options
        table_name = "messages"
        indexes = ((("session", "turn_id"), False),)


class ToolUsageRecord(_BaseModel):
    """One tool call, attempted or refused."""

    id = peewee.AutoField()
    session = peewee.ForeignKeyField(SessionRecord, column_name="session_id", field="session_id", backref="tool_usage")
    turn_id = peewee.IntegerField()
    agent_name = peewee.TextField()
    tool_name = peewee.TextField()
    operation = peewee.TextField(null=True)
    tool_params = peewee.TextField()
    tool_result = peewee.TextField()
    timestamp = peewee.TextField()
    success = peewee.IntegerField()
    status_code = peewee.TextField(null=True)
    latency_ms = peewee.FloatField(null=True)

    class Meta:  # noqa: D106 - Peewee options
        table_name = "tool_usage"
        indexes = ((("session", "turn_id"), False),)


class EventRecord(_BaseModel):
    """A service error or health result, with enough detail to debug it by SQL."""

    id = peewee.AutoField()
    session = peewee.ForeignKeyField(
        SessionRecord, column_name="session_id", field="session_id", backref="events", null=True
    )
    turn_id = peewee.IntegerField(null=True)
    agent_name = peewee.TextField(null=True)
    service = peewee.TextField()
    operation = peewee.TextField()
    status_code = peewee.TextField()
    detail = peewee.TextField()
    latency_ms = peewee.FloatField(null=True)
    timestamp = peewee.TextField()

    class Meta:  # noqa: D106 - Peewee options
        table_name = "events"
        indexes = ((("session", "id"), False),)


MODELS: tuple[type[peewee.Model], ...] = (SessionRecord, MessageRecord, ToolUsageRecord, EventRecord)
