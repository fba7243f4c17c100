"""The audit trail, the single source of truth of every session.

- ``schema``: the Peewee models (the seed's tables plus ``events``)
- ``rows``: what one turn writes, committed together
- ``database``: opening a URL (SQLite tuned for several writers) and in-place migrations
- ``store``: ``AuditStore``, writes on one writer thread and readers for the CLI
- ``tokens``: a session's LLM token totals, per agent, summed from its ``messages`` rows
"""

from heist_common.audit.database import (
    AuditError,
    CallNotPendingError,
    SessionTakenOverError,
    UnknownCallError,
    UnknownSessionError,
)
from heist_common.audit.rows import EventRow, MessageRow, ToolUsageRow, TurnAudit
from heist_common.audit.schema import (
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
from heist_common.audit.store import AuditStore
from heist_common.audit.tokens import TokenCount, TokenTotals

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
    "TokenCount",
    "TokenTotals",
    "ToolCallRecord",
    "ToolUsageRecord",
    "ToolUsageRow",
    "TurnAudit",
    "UnknownCallError",
    "UnknownSessionError",
    "now_iso",
]
