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
    GATEWAY = "gateway"
    """Not a heist: the MCP gateway's log of one OAuth client's tool calls (``servers.mcp_gateway``), never resumed."""
    AWAITING_APPROVAL = "awaiting_approval"
    """Running, and a tool call waits for a person's approval (``orchestrator approvals``); like ``active`` else."""
    CANCELLED = "cancelled"
    """Stopped on request (A2A CancelTask on ``orchestrator serve``); not resumable."""


RUNNING_STATUSES = frozenset({SessionStatus.ACTIVE, SessionStatus.AWAITING_APPROVAL})
"""Statuses of a session some process is (or was, until it died) playing."""


RESULT_UNKNOWN = "RESULT_UNKNOWN"
"""``tool_usage.status_code`` of a call that was sent by a process that died before its result was recorded."""
DENIED = "DENIED"
"""``tool_usage.status_code`` of a call a person (or ``session.approval_timeout_s``) denied: never sent."""


class CallStatus:
    """Values of ``tool_calls.status``: where one tool call is, written before anything happens to it."""

    PENDING_APPROVAL = "pending_approval"
    APPROVED = "approved"
    """Approved and not sent yet (a resume sends it)."""
    DENIED = "denied"
    """Denied by a person or by ``session.approval_timeout_s``: never sent."""
    STARTED = "started"
    """Sent (or about to be): a resume finding it so does not know whether it ran."""
    DONE = "done"
    """Its outcome is in ``tool_usage`` (committed with its turn)."""
    UNKNOWN = "unknown"
    """Started by a process that died before its result was recorded; never sent again unless idempotent."""


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
    # The objective it was played with (a service caller may send its own); resume continues with it.
    objective = peewee.TextField(null=True)

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
    # LLM tokens of the turn's requests, summed (NULL: no request answered, or written before tokens were counted):
    prompt_tokens = peewee.IntegerField(null=True)
    completion_tokens = peewee.IntegerField(null=True)
    tokens_estimated = peewee.BooleanField(null=True)  # some request had no usage from the server: estimated

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
    call_id = peewee.TextField(null=True)  # tool_calls.call_id of a call that was sent or waited for approval

    class Meta:  # noqa: D106 - Peewee options
        table_name = "tool_usage"
        indexes = ((("session", "turn_id"), False),)


class ToolCallRecord(_BaseModel):
    """One tool call's state, written before it is sent (or waits for approval): what makes calls exactly-once.

    ``call_id`` is ``<turn>.<index>`` within the session, also sent as ``x-call-id``
    metadata, which the servers log: audit and access logs can be matched call for call.
    """

    id = peewee.AutoField()
    session = peewee.ForeignKeyField(SessionRecord, column_name="session_id", field="session_id", backref="tool_calls")
    call_id = peewee.TextField()
    turn_id = peewee.IntegerField()
    call_index = peewee.IntegerField()
    agent_name = peewee.TextField()
    tool_name = peewee.TextField()
    operation = peewee.TextField()
    tool_params = peewee.TextField()
    status = peewee.TextField()
    created_at = peewee.TextField()
    decided_at = peewee.TextField(null=True)
    decided_by = peewee.TextField(null=True)
    reason = peewee.TextField(null=True)
    started_at = peewee.TextField(null=True)
    finished_at = peewee.TextField(null=True)

    class Meta:  # noqa: D106 - Peewee options
        table_name = "tool_calls"
        indexes = ((("session", "call_id"), True), (("status",), False))


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


MODELS: tuple[type[peewee.Model], ...] = (SessionRecord, MessageRecord, ToolUsageRecord, EventRecord, ToolCallRecord)
