"""The audit trail, the single source of truth of every session.

- ``schema``: the Peewee models (the seed's tables plus ``events``)
- ``rows``: what one turn writes, committed together
- ``database``: opening a URL (SQLite tuned for several writers) and in-place migrations
- ``store``: ``AuditStore``, writes on one writer thread and readers for the CLI
- ``tokens``: a session's LLM token totals, per agent, summed from its ``messages`` rows
"""

from heist_common.audit.database import AuditError, SessionTakenOverError, UnknownSessionError
from heist_common.audit.rows import EventRow, MessageRow, ToolUsageRow, TurnAudit
from heist_common.audit.schema import EventRecord, MessageRecord, SessionRecord, SessionStatus, ToolUsageRecord, now_iso
from heist_common.audit.store import AuditStore
from heist_common.audit.tokens import TokenCount, TokenTotals

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
    "TokenCount",
    "TokenTotals",
    "ToolUsageRecord",
    "ToolUsageRow",
    "TurnAudit",
    "UnknownSessionError",
    "now_iso",
]
