"""The audit trail, the single source of truth of every session.

- ``schema``: the Peewee models (the seed's tables plus ``events``)
- ``rows``: what one turn writes, committed together
- ``database``: opening a URL (SQLite tuned for several writers) and in-place migrations
- ``store``: ``AuditStore``, writes on one writer thread and readers for the CLI
"""

from heist_common.audit.database import AuditError, SessionTakenOverError, UnknownSessionError
from heist_common.audit.rows import EventRow, MessageRow, ToolUsageRow, TurnAudit
from heist_common.audit.schema import EventRecord, MessageRecord, SessionRecord, SessionStatus, ToolUsageRecord, now_iso
from heist_common.audit.store import AuditStore

__all__ = [
    "AuditError",
    "AuditStore",
    "EventRecord",
    "EventRow",
    "MessageRecord",
    "MessageRow",
    "SessionRecord",
    "SessionStatus",
    "SessionTakenOverError",
    "ToolUsageRecord",
    "ToolUsageRow",
    "TurnAudit",
    "UnknownSessionError",
    "now_iso",
]
