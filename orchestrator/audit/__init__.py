"""The audit trail, the single source of truth of every session.

- ``schema``: the Peewee models (the seed's tables plus ``events``)
- ``rows``: what one turn writes, committed together
- ``database``: opening a URL (SQLite tuned for several writers) and in-place migrations
- ``store``: ``AuditStore``, writes on one writer thread and readers for the CLI
"""

from orchestrator.audit.database import (
    AuditError,
    CallNotPendingError,
    SessionTakenOverError,
    UnknownCallError,
    UnknownSessionError,
)
from orchestrator.audit.rows import EventRow, MessageRow, ToolUsageRow, TurnAudit
from orchestrator.audit.schema import (
    DENIED,
    RESULT_UNKNOWN,
    RUNNING_STATUSES,
    CallStatus,
    EventRecord,
    MessageRecord,
    SessionRecord,
    SessionStatus,
    ToolCallRecord,
    ToolUsageRecord,
    now_iso,
)
from orchestrator.audit.store import AuditStore

__all__ = [
    "DENIED",
    "RESULT_UNKNOWN",
    "RUNNING_STATUSES",
    "AuditError",
    "AuditStore",
    "CallNotPendingError",
    "CallStatus",
    "EventRecord",
    "EventRow",
    "MessageRecord",
    "MessageRow",
    "SessionRecord",
    "SessionStatus",
    "SessionTakenOverError",
    "ToolCallRecord",
    "ToolUsageRecord",
    "ToolUsageRow",
    "TurnAudit",
    "UnknownCallError",
    "UnknownSessionError",
    "now_iso",
]
