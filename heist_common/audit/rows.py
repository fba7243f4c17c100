"""What a turn writes, collected as plain rows and committed in one transaction.

Why rows beside the models: a turn builds a handful of them on the hot path, and
slotted dataclasses cost a fraction of Peewee model instances; their fields are
the models' column names, which ``_PreparedInsert`` checks when it builds the
SQL (a row field with no column fails at start-up, not at the first write).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import peewee

from heist_common.audit.schema import now_iso


@dataclass(slots=True)
class MessageRow:
    """A ``messages`` row before it is written."""

    turn_id: int
    agent_name: str
    agent_role: str
    message: str
    status: str = "ok"
    latency_ms: float | None = None
    timestamp: str = field(default_factory=now_iso)
    trace_id: str | None = None
    timings: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_estimated: bool | None = None


@dataclass(slots=True)
class ToolUsageRow:
    """A ``tool_usage`` row before it is written."""

    turn_id: int
    agent_name: str
    tool_name: str
    operation: str
    tool_params: str
    tool_result: str
    success: bool
    status_code: str | None = None
    latency_ms: float | None = None
    timestamp: str = field(default_factory=now_iso)
    call_id: str | None = None
    """The ``tool_calls`` record of a call that was sent or waited for approval (None: refused before)."""


@dataclass(slots=True)
class EventRow:
    """An ``events`` row before it is written."""

    service: str
    operation: str
    status_code: str
    detail: str
    latency_ms: float | None = None
    turn_id: int | None = None
    agent_name: str | None = None
    timestamp: str = field(default_factory=now_iso)


@dataclass(slots=True)
class TurnAudit:
    """Everything one turn writes, committed together in one transaction."""

    message: MessageRow | None = None
    tool_usage: list[ToolUsageRow] = field(default_factory=list)
    events: list[EventRow] = field(default_factory=list)


class _PreparedInsert:
    """One model's INSERT for the fields of a row dataclass: SQL text built once, executed with fresh values.

    Why: building the statement is most of a turn's write cost with Peewee's
    query builder, while the SQL never changes. Table, columns and value conversion still come from the model.
    """

    def __init__(self, database: peewee.Database, model: type[peewee.Model], row_type: type[Any]) -> None:
        names = ["session", *(f.name for f in dataclasses.fields(row_type))]
        meta: Any = model._meta
        unknown = [name for name in names if name not in meta.fields]
        if unknown:
            raise TypeError(f"{row_type.__name__} fields {unknown} have no column in table {meta.table_name!r}")
        self._fields = [meta.fields[name] for name in names]
        self._names = names[1:]
        quote: str = database.quote
        open_quote, close_quote = quote[0], quote[1]
        columns = ", ".join(f"{open_quote}{f.column_name}{close_quote}" for f in self._fields)
        placeholders = ", ".join([database.param] * len(self._fields))
        self.sql = f"INSERT INTO {open_quote}{meta.table_name}{close_quote} ({columns}) VALUES ({placeholders})"
        self._database = database

    def execute(self, session_id: str | None, row: Any) -> None:
        values = [session_id, *(getattr(row, name) for name in self._names)]
        params = [field.db_value(value) for field, value in zip(self._fields, values, strict=True)]
        self._database.execute_sql(self.sql, params)  # type: ignore[no-untyped-call]
