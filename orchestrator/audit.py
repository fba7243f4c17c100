"""The audit trail: Peewee models on SQLite, the single source of truth of every session.

Table and column names keep the seed's schema (``sessions``, ``messages``,
``tool_usage``) so ``SELECT * FROM messages WHERE session_id = ?`` works as
before; ``events`` adds every service error and health result. Writes go
through ONE dedicated writer thread: Peewee is synchronous, and a single writer
means the event loop never blocks on SQLite and writes never race each other.
Transactions start with ``BEGIN IMMEDIATE`` and a busy timeout, so several
orchestrator processes can share one database without "database is locked".
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import peewee
from playhouse.db_url import connect, parse  # type: ignore[import-untyped]
from playhouse.migrate import SchemaMigrator, migrate

__all__ = [
    "AuditError",
    "AuditStore",
    "EventRecord",
    "EventRow",
    "MessageRecord",
    "MessageRow",
    "SessionRecord",
    "SessionStatus",
    "ToolUsageRecord",
    "ToolUsageRow",
    "TurnAudit",
    "UnknownSessionError",
    "now_iso",
]

T = TypeVar("T")
database_proxy = peewee.DatabaseProxy()
BUSY_TIMEOUT_MS = 5000


class SessionStatus:
    """Values of ``sessions.status``."""

    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class AuditError(RuntimeError):
    """The audit database cannot be opened or written (read-only, disk full, unreachable)."""


class UnknownSessionError(LookupError):
    """No session with that ID in the audit database."""


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
    seed = peewee.IntegerField(null=True)
    model = peewee.TextField(null=True)
    error = peewee.TextField(null=True)

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
    query builder (measured: about 70% of ``_write_turn``), while the SQL never
    changes. Table, columns and value conversion still come from the model.
    """

    def __init__(self, database: peewee.Database, model: type[peewee.Model], row_type: type[Any]) -> None:
        names = ["session", *(f.name for f in dataclasses.fields(row_type))]
        meta: Any = model._meta
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


def _add_missing_columns(database: peewee.Database) -> None:
    """Add nullable columns that newer models have to tables an older version created.

    ``create_tables(safe=True)`` leaves existing tables alone, so an audit file
    from before a column existed (e.g. ``messages.trace_id``) would fail every
    insert; old rows simply get NULL there.
    """
    migrator = SchemaMigrator.from_database(database)
    for model in MODELS:
        meta: Any = model._meta
        existing = {column.name for column in database.get_columns(meta.table_name)}
        missing = [f for f in meta.sorted_fields if f.column_name not in existing and f.null]
        if missing:
            migrate(*(migrator.add_column(meta.table_name, f.column_name, f) for f in missing))


def _sqlite_path(url: str) -> Path | None:
    parsed = parse(url)
    if not url.startswith("sqlite"):
        return None
    database = parsed.get("database")
    if not isinstance(database, str) or not database or database == ":memory:":
        return None
    return Path(database)


def _open_database(url: str) -> peewee.Database:
    """Connect from a ``playhouse.db_url`` URL; SQLite gets WAL, foreign keys and BEGIN IMMEDIATE."""
    options: dict[str, Any] = {}
    sqlite_file = _sqlite_path(url)
    if url.startswith("sqlite"):
        options = {
            "pragmas": (
                ("busy_timeout", BUSY_TIMEOUT_MS),
                ("journal_mode", "wal"),
                ("foreign_keys", 1),
                ("synchronous", "normal"),
            ),
            "timeout": BUSY_TIMEOUT_MS / 1000,
            "lock_type": "IMMEDIATE",
        }
    if sqlite_file is not None:
        sqlite_file.parent.mkdir(parents=True, exist_ok=True)
    database: peewee.Database = connect(url, **options)
    return database


_DB_ERRORS = (peewee.PeeweeException, sqlite3.Error, OSError)
OPEN_RETRY_DELAY_S = 0.02
"""Pause between attempts to open a database another process is just creating."""


def _root_cause(exc: BaseException) -> BaseException:
    """Return the database error that started it all.

    When COMMIT fails (disk full), SQLite has already rolled back, so Peewee's
    own rollback fails with "cannot rollback - no transaction is active" and
    would hide the real reason; report the error it was handling instead.
    """
    while "no transaction is active" in str(exc) and isinstance(exc.__context__, _DB_ERRORS):
        exc = exc.__context__
    return exc


class AuditStore:
    """The audit database behind one writer thread.

    Async methods run on the writer thread and are awaited from the event loop;
    ``read_*`` methods are synchronous for the CLI. One open store per process
    (Peewee models are bound through a module-level proxy).
    """

    def __init__(self, url: str, database: peewee.Database) -> None:
        self.url = url
        self.database = database
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-writer")
        self._insert_message = _PreparedInsert(database, MessageRecord, MessageRow)
        self._insert_tool_usage = _PreparedInsert(database, ToolUsageRecord, ToolUsageRow)
        self._insert_event = _PreparedInsert(database, EventRecord, EventRow)
        marker = "\x00session"
        count_turn = SessionRecord.update(num_turns=SessionRecord.num_turns + 1).where(
            SessionRecord.session_id == marker
        )
        self._count_turn_sql, params = count_turn.sql()
        self._count_turn_params: list[Any] = list(params)
        self._count_turn_session = self._count_turn_params.index(marker)

    @classmethod
    def open(cls, url: str) -> AuditStore:
        """Connect, create missing tables, and start the writer thread; AuditError if unreachable.

        Several processes creating the same new SQLite file at once race on
        ``PRAGMA journal_mode=wal``, which SQLite refuses with "database is
        locked" without waiting for its busy timeout; so a locked open is retried
        until that timeout has passed (once the file is in WAL mode the pragma
        needs no lock and the race is over).
        """
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                database = _open_database(url)
                database_proxy.initialize(database)
                with database.connection_context():
                    database.create_tables(MODELS, safe=True)
                    _add_missing_columns(database)
                return cls(url, database)
            except _DB_ERRORS as exc:
                if "database is locked" not in str(exc) or time.monotonic() >= deadline:
                    raise AuditError(f"cannot open audit database {url}: {exc}") from None
                time.sleep(OPEN_RETRY_DELAY_S)

    @property
    def location(self) -> str:
        """The database file for SQLite, else the URL (for summaries)."""
        path = _sqlite_path(self.url)
        return str(path) if path is not None else self.url

    def close(self) -> None:
        """Finish queued writes, then close the writer's connection."""
        self._writer.submit(self._close_connection)
        self._writer.shutdown(wait=True)
        if not self.database.is_closed():
            self.database.close()

    def _close_connection(self) -> None:
        if not self.database.is_closed():
            self.database.close()

    async def _in_writer(self, work: Callable[[], T], what: str) -> T:
        def guarded() -> T:
            try:
                return work()
            except _DB_ERRORS as exc:
                raise AuditError(f"audit database {self.location}: cannot {what}: {_root_cause(exc)}") from None

        return await asyncio.get_running_loop().run_in_executor(self._writer, guarded)

    async def run_in_writer(self, work: Callable[[], T]) -> T:
        """Run arbitrary database work on the writer thread (tests and tools use this)."""
        return await self._in_writer(work, "run a statement")

    async def create_session(self, session_id: str, *, strategy: str, seed: int | None, model: str) -> None:
        """Insert the session as ``active`` (a reused ID is an error, not a merge)."""

        def work() -> None:
            with self.database.atomic():
                SessionRecord.create(
                    session_id=session_id,
                    start_time=now_iso(),
                    status=SessionStatus.ACTIVE,
                    strategy=strategy,
                    seed=seed,
                    model=model,
                )

        await self._in_writer(work, f"create session {session_id}")

    async def write_turn(self, session_id: str, turn: TurnAudit) -> None:
        """Commit one turn's message, tool calls and events in a single transaction."""
        await self._in_writer(lambda: self._write_turn(session_id, turn), "write a turn")

    def _write_turn(self, session_id: str, turn: TurnAudit) -> None:
        with self.database.atomic():
            for usage in turn.tool_usage:
                self._insert_tool_usage.execute(session_id, usage)
            for event in turn.events:
                self._insert_event.execute(session_id, event)
            if turn.message is not None:
                self._insert_message.execute(session_id, turn.message)
                params = list(self._count_turn_params)
                params[self._count_turn_session] = session_id
                self.database.execute_sql(self._count_turn_sql, params)  # type: ignore[no-untyped-call]

    async def add_events(self, session_id: str | None, events: Sequence[EventRow]) -> None:
        """Record events outside a turn (health checks, session-level failures) in one transaction."""

        def work() -> None:
            with self.database.atomic():
                EventRecord.insert_many([{"session": session_id, **asdict(row)} for row in events]).execute()

        if events:
            await self._in_writer(work, "record events")

    async def finish_session(self, session_id: str, status: str, error: str | None = None) -> None:
        """Close the session with its final status and end time."""

        def update() -> None:
            with self.database.atomic():
                SessionRecord.update(status=status, end_time=now_iso(), error=error).where(
                    SessionRecord.session_id == session_id
                ).execute()

        def work() -> None:
            try:
                update()
            except _DB_ERRORS:
                # Disk full: checkpointing the WAL into the database file and truncating it frees
                # room for this one small update, so even a failed run is marked as failed.
                if not isinstance(self.database, peewee.SqliteDatabase):
                    raise
                self.database.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")  # type: ignore[no-untyped-call]
                update()

        await self._in_writer(work, f"finish session {session_id}")

    async def agent_messages(self, session_id: str) -> list[tuple[str, int, str]]:
        """``(agent_name, turn_id, message)`` of a session in turn order (to rebuild the memory service)."""

        def work() -> list[tuple[str, int, str]]:
            query = (
                MessageRecord.select(MessageRecord.agent_name, MessageRecord.turn_id, MessageRecord.message)
                .where(MessageRecord.session == session_id)
                .order_by(MessageRecord.turn_id)
                .tuples()
            )
            return [(str(a), int(t), str(m)) for a, t, m in cast("list[tuple[Any, Any, Any]]", list(query))]

        return await self._in_writer(work, "read messages")

    # Synchronous readers for the CLI -------------------------------------------------------------

    def read_sessions(self) -> list[dict[str, Any]]:
        """Every session, newest first."""
        try:
            with self.database.connection_context():
                query = SessionRecord.select().order_by(SessionRecord.start_time.desc()).dicts()
                return cast("list[dict[str, Any]]", list(query))
        except _DB_ERRORS as exc:
            raise AuditError(f"cannot read sessions from {self.location}: {exc}") from None

    def read_session_log(self, session_id: str) -> dict[str, Any]:
        """Session metadata, messages, tool usage and events; UnknownSessionError if absent."""
        try:
            with self.database.connection_context():
                session = SessionRecord.select().where(SessionRecord.session_id == session_id).dicts().first()
                if session is None:
                    raise UnknownSessionError(session_id)

                def rows(model: type[peewee.Model]) -> list[dict[str, Any]]:
                    query = model.select().where(model.session == session_id).order_by(model.id).dicts()  # type: ignore[attr-defined]
                    found = cast("list[dict[str, Any]]", list(query))
                    return [{("session_id" if k == "session" else k): v for k, v in row.items()} for row in found]

                return {
                    "session": session,
                    "messages": rows(MessageRecord),
                    "tool_usage": rows(ToolUsageRecord),
                    "events": rows(EventRecord),
                }
        except _DB_ERRORS as exc:
            raise AuditError(f"cannot read session {session_id} from {self.location}: {exc}") from None
