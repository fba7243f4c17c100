"""The audit store: every write on one dedicated writer thread, readers for the CLI.

Writes go through ONE writer thread: Peewee is synchronous, and a single writer
means the event loop never blocks on the database and writes never race each
other. SQLite transactions start with ``BEGIN IMMEDIATE`` and a busy timeout, so
several orchestrator processes can share one file without "database is locked";
on PostgreSQL the same transactions only lock the rows they touch.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, TypeVar, cast

import peewee

from heist_common.audit.database import (
    _DB_ERRORS,
    BUSY_TIMEOUT_MS,
    OPEN_RETRY_DELAY_S,
    AuditError,
    CallNotPendingError,
    SessionTakenOverError,
    UnknownCallError,
    UnknownSessionError,
    _open_database,
    _root_cause,
    _sqlite_path,
    create_schema,
    one_line,
    use_wal,
)
from heist_common.audit.rows import EventRow, MessageRow, ToolUsageRow, TurnAudit, _PreparedInsert
from heist_common.audit.schema import (
    RESULT_UNKNOWN,
    RUNNING_STATUSES,
    CallStatus,
    EventRecord,
    MessageRecord,
    SessionRecord,
    SessionStatus,
    ToolCallRecord,
    ToolUsageRecord,
    database_proxy,
    now_iso,
)
from heist_common.audit.tokens import TokenCount, TokenTotals
from heist_common.config import redact_url

T = TypeVar("T")


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
        self.pid = os.getpid()
        self.host = socket.gethostname()
        """Who owns the sessions this store creates or resumes (``sessions.pid``/``host``)."""
        marker, beat = "\x00session", "\x00heartbeat"
        count_turn = SessionRecord.update(num_turns=SessionRecord.num_turns + 1, heartbeat_at=beat).where(
            (SessionRecord.session_id == marker) & self._owned()
        )
        self._count_turn_sql, params = count_turn.sql()
        self._count_turn_params: list[Any] = list(params)
        self._count_turn_session = self._count_turn_params.index(marker)
        self._count_turn_beat = self._count_turn_params.index(beat)
        update_timings = MessageRecord.update(timings=marker).where(
            (MessageRecord.session == marker) & (MessageRecord.turn_id == 0)
        )
        self._timings_sql, _ = update_timings.sql()
        self._pending_timings: deque[tuple[str, str, int]] = deque()
        """(timings JSON, session, turn) for the next transaction: appended on the loop, taken on the writer."""

    def _owned(self) -> peewee.Expression:
        """``sessions`` rows this process owns: the fence that stops writes after another process resumed one."""
        expression: peewee.Expression = (SessionRecord.pid == self.pid) & (SessionRecord.host == self.host)
        return expression

    @classmethod
    def open(cls, url: str) -> AuditStore:
        """Connect, create missing tables, and start the writer thread; AuditError if unreachable.

        The busy timeout is set when connecting, before any statement. Several
        processes creating the same new SQLite file at once race on switching it
        to WAL mode, which SQLite refuses with "database is locked" without
        waiting for its busy timeout; so a locked open is retried until that
        timeout has passed (once the file is in WAL mode nobody switches it
        again and the race is over). A file that has its schema is opened with
        reads only (``create_schema``), so a busy writer never makes it fail.
        """
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                database = _open_database(url)
                database_proxy.initialize(database)
                with database.connection_context():
                    use_wal(database)
                    create_schema(database)
                return cls(url, database)
            except _DB_ERRORS as exc:
                if "database is locked" not in str(exc) or time.monotonic() >= deadline:
                    raise AuditError(f"cannot open audit database {redact_url(url)}: {one_line(exc)}") from None
                time.sleep(OPEN_RETRY_DELAY_S)

    @property
    def location(self) -> str:
        """The database file for SQLite, else the URL without its password (for summaries and errors)."""
        path = _sqlite_path(self.url)
        return str(path) if path is not None else redact_url(self.url)

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
        import asyncio  # here, not at the top: the CLI's synchronous readers never load it

        def guarded() -> T:
            try:
                return work()
            except _DB_ERRORS as exc:
                reason = one_line(_root_cause(exc))
                self._drop_broken_connection()
                raise AuditError(f"audit database {self.location}: cannot {what}: {reason}") from None

        return await asyncio.get_running_loop().run_in_executor(self._writer, guarded)

    def _drop_broken_connection(self) -> None:
        """Forget a server connection that died (PostgreSQL restarted), so the next call connects afresh.

        The failed write still fails the run, but the final status update can
        then reach the server, and the session ends ``failed`` instead of
        staying ``active``. A SQLite file has no connection to lose.
        """
        database = self.database
        if isinstance(database, peewee.SqliteDatabase) or database.is_closed() or database.is_connection_usable():
            return
        with contextlib.suppress(*_DB_ERRORS):
            database.close()  # forgets the connection even when the driver fails to close it

    async def run_in_writer(self, work: Callable[[], T]) -> T:
        """Run arbitrary database work on the writer thread (tests and tools use this)."""
        return await self._in_writer(work, "run a statement")

    def _owned_session(self, session_id: str, status: str, **fields: Any) -> dict[str, Any]:
        """Build a new ``sessions`` row owned by this process, started (and last alive) now."""
        started = now_iso()
        return {
            "session_id": session_id, "start_time": started, "status": status,
            "pid": self.pid, "host": self.host, "heartbeat_at": started, **fields,
        }  # fmt: skip

    async def create_session(
        self,
        session_id: str,
        *,
        strategy: str,
        seed: int | None,
        model: str,
        turns_planned: int | None = None,
        client_id: str | None = None,
        objective: str | None = None,
    ) -> None:
        """Insert the session as ``active``, owned by this process (a reused ID is an error, not a merge).

        ``client_id``: the OAuth client that started it through ``orchestrator serve`` (its tenant);
        ``objective``: what the crew plans, kept so ``resume`` continues the same heist.
        """
        fields = {"strategy": strategy, "seed": seed, "model": model, "turns_planned": turns_planned,
                  "client_id": client_id, "objective": objective}  # fmt: skip

        def work() -> None:
            with self.database.atomic():
                SessionRecord.create(**self._owned_session(session_id, SessionStatus.ACTIVE, **fields))

        await self._in_writer(work, f"create session {session_id}")

    async def ensure_session(self, session_id: str, *, status: str, strategy: str, model: str) -> None:
        """Create the session unless it exists (a log several processes append to, e.g. the MCP gateway's)."""

        def work() -> None:
            with self.database.atomic():
                row = self._owned_session(session_id, status, strategy=strategy, model=model)
                SessionRecord.insert(**row).on_conflict_ignore().execute()

        await self._in_writer(work, f"open session {session_id}")

    async def write_turn(self, session_id: str, turn: TurnAudit) -> None:
        """Commit one turn's message, tool calls and events in a single transaction."""
        await self._in_writer(lambda: self._write_turn(session_id, turn), "write a turn")

    def update_timings(self, session_id: str, turn_id: int, timings: str) -> None:
        """Replace a written turn's ``messages.timings`` with the complete timeline, in the next transaction.

        Why not a write of its own: the last steps of a turn (the audit write
        itself, StoreMemory) end after the turn's row is committed, and one more
        transaction per turn would cost the turn's critical path; so the update
        rides on the next turn's transaction, or on the session's end.
        """
        self._pending_timings.append((timings, session_id, turn_id))

    def _apply_pending_timings(self) -> None:
        while self._pending_timings:
            params = list(self._pending_timings.popleft())
            self.database.execute_sql(self._timings_sql, params)  # type: ignore[no-untyped-call]

    def _write_turn(self, session_id: str, turn: TurnAudit) -> None:
        with self.database.atomic():
            self._apply_pending_timings()
            for usage in turn.tool_usage:
                self._insert_tool_usage.execute(session_id, usage)
                if usage.call_id is not None:  # the call's outcome is recorded now: it is settled
                    settled = CallStatus.UNKNOWN if usage.status_code == RESULT_UNKNOWN else CallStatus.DONE
                    ToolCallRecord.update(status=settled, finished_at=usage.timestamp).where(
                        (ToolCallRecord.session == session_id)
                        & (ToolCallRecord.call_id == usage.call_id)
                        & (ToolCallRecord.status == CallStatus.STARTED)
                    ).execute()
            for event in turn.events:
                self._insert_event.execute(session_id, event)
            if turn.message is not None:
                self._insert_message.execute(session_id, turn.message)
                params = list(self._count_turn_params)
                params[self._count_turn_session] = session_id
                params[self._count_turn_beat] = turn.message.timestamp
                cursor = self.database.execute_sql(self._count_turn_sql, params)  # type: ignore[no-untyped-call]
                if cursor.rowcount != 1:  # raising inside atomic() rolls the whole turn back
                    raise self._taken_over(session_id)

    def _taken_over(self, session_id: str) -> SessionTakenOverError:
        owner = (
            SessionRecord.select(SessionRecord.pid, SessionRecord.host)
            .where(SessionRecord.session_id == session_id)
            .first()
        )
        by = f" by pid {owner.pid} on {owner.host}" if owner is not None else ""
        return SessionTakenOverError(f"session {session_id} was resumed{by}: this process no longer writes to it")

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
                self._apply_pending_timings()
                updated = (
                    SessionRecord.update(status=status, end_time=now_iso(), error=error)
                    .where((SessionRecord.session_id == session_id) & self._owned())
                    .execute()
                )
                if updated != 1:
                    raise self._taken_over(session_id)

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

    async def settle_session(
        self, session_id: str, status: str, error: str, end_time: str, owner: tuple[int, str], event: EventRow
    ) -> bool:
        """Record the end a session's own process could not write; return whether the row was still waiting for it.

        Only a row still ``active`` and owned by ``owner`` (pid, host) is
        changed: one resumed or finished since then is left as it is. The
        ``event`` is recorded with it, in the same transaction.
        """

        def work() -> bool:
            pid, host = owner
            with self.database.atomic():
                updated = (
                    SessionRecord.update(status=status, end_time=end_time, error=error)
                    .where(
                        (SessionRecord.session_id == session_id)
                        & (SessionRecord.status == SessionStatus.ACTIVE)
                        & (SessionRecord.pid == pid)
                        & (SessionRecord.host == host)
                    )
                    .execute()
                )
                if updated == 1:
                    EventRecord.insert({"session": session_id, **asdict(event)}).execute()
            return int(updated) == 1

        return await self._in_writer(work, f"record the end of session {session_id}")

    async def session_state(self, session_id: str) -> tuple[dict[str, Any], list[tuple[int, str, str, str, str]]]:
        """Read the ``sessions`` row and ``(turn_id, agent_name, agent_role, message, status)`` in turn order.

        What a resume starts from; raises UnknownSessionError if there is no such session.
        """

        def work() -> tuple[dict[str, Any], list[tuple[int, str, str, str, str]]]:
            row = SessionRecord.select().where(SessionRecord.session_id == session_id).dicts().first()
            if row is None:
                raise UnknownSessionError(session_id)
            query = (
                MessageRecord.select(
                    MessageRecord.turn_id,
                    MessageRecord.agent_name,
                    MessageRecord.agent_role,
                    MessageRecord.message,
                    MessageRecord.status,
                )
                .where(MessageRecord.session == session_id)
                .order_by(MessageRecord.turn_id)
                .tuples()
            )
            rows = cast("list[tuple[Any, Any, Any, Any, Any]]", list(query))
            return cast("dict[str, Any]", row), [(int(t), str(a), str(r), str(m), str(s)) for t, a, r, m, s in rows]

        return await self._in_writer(work, f"read session {session_id}")

    async def claim_session(self, session_id: str, expected: Mapping[str, Any]) -> bool:
        """Take a session over for resuming, only if its row still is exactly as ``expected`` (compare and set).

        Why compare and set: two ``resume`` commands, or a resume racing the
        session's own process, must not both continue it. The row's status,
        owner, heartbeat and turn count must be unchanged since they were read;
        then it becomes ``active`` again and owned by this process. Returns
        whether this process won.
        """

        def work() -> bool:
            condition = SessionRecord.session_id == session_id
            for name in ("status", "pid", "host", "heartbeat_at", "num_turns"):
                column = getattr(SessionRecord, name)
                value = expected[name]
                condition &= column.is_null() if value is None else column == value
            with self.database.atomic():
                claimed = (
                    SessionRecord.update(
                        status=SessionStatus.ACTIVE,
                        pid=self.pid,
                        host=self.host,
                        heartbeat_at=now_iso(),
                        end_time=None,
                        error=None,
                    )
                    .where(condition)
                    .execute()
                )
            return int(claimed) == 1

        return await self._in_writer(work, f"claim session {session_id}")

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

    # Tool calls: each is written before it is sent or waits for approval -------------------------

    async def open_tool_call(self, session_id: str, fields: Mapping[str, Any]) -> None:
        """Insert a tool call's record (``pending_approval`` or ``started``), only while this process owns the session.

        Awaited before the RPC: a call that was sent always has a record, so a
        resume knows it may have run.
        """

        def work() -> None:
            with self.database.atomic():
                owned = SessionRecord.select(SessionRecord.session_id).where(
                    (SessionRecord.session_id == session_id) & self._owned()
                )
                if not owned.exists():
                    raise self._taken_over(session_id)
                ToolCallRecord.create(session=session_id, **fields)

        await self._in_writer(work, "record a tool call")

    async def start_tool_call(self, session_id: str, call_id: str) -> bool:
        """Mark an approved (or just opened) call ``started`` right before it is sent; False if it is not approved."""

        def work() -> bool:
            with self.database.atomic():
                updated = (
                    ToolCallRecord.update(status=CallStatus.STARTED, started_at=now_iso())
                    .where(
                        (ToolCallRecord.session == session_id)
                        & (ToolCallRecord.call_id == call_id)
                        & (ToolCallRecord.status == CallStatus.APPROVED)
                    )
                    .execute()
                )
            return int(updated) == 1

        return await self._in_writer(work, "start a tool call")

    async def tool_call(self, session_id: str, call_id: str) -> dict[str, Any]:
        """One tool call's record; UnknownCallError if there is none."""
        return await self._in_writer(lambda: self._tool_call(session_id, call_id), "read a tool call")

    def _tool_call(self, session_id: str, call_id: str) -> dict[str, Any]:
        row = (
            ToolCallRecord.select()
            .where((ToolCallRecord.session == session_id) & (ToolCallRecord.call_id == call_id))
            .dicts()
            .first()
        )
        if row is None:
            raise UnknownCallError(f"session {session_id} has no tool call {call_id!r} (see 'orchestrator approvals')")
        return _call_dict(row)

    async def unsettled_tool_calls(self, session_id: str, after_turn: int) -> list[dict[str, Any]]:
        """Return the calls of turns after ``after_turn`` (none committed): what a killed turn left, in call order."""

        def work() -> list[dict[str, Any]]:
            query = (
                ToolCallRecord.select()
                .where((ToolCallRecord.session == session_id) & (ToolCallRecord.turn_id > after_turn))
                .order_by(ToolCallRecord.turn_id, ToolCallRecord.call_index)
                .dicts()
            )
            return [_call_dict(row) for row in query]

        return await self._in_writer(work, "read unsettled tool calls")

    async def set_awaiting_approval(self, session_id: str, awaiting: bool) -> None:
        """Switch the session between ``active`` and ``awaiting_approval`` (and beat its heart); fenced on the owner."""
        status = SessionStatus.AWAITING_APPROVAL if awaiting else SessionStatus.ACTIVE

        def work() -> None:
            with self.database.atomic():
                updated = (
                    SessionRecord.update(status=status, heartbeat_at=now_iso())
                    .where(
                        (SessionRecord.session_id == session_id)
                        & self._owned()
                        & SessionRecord.status.in_(RUNNING_STATUSES)
                    )
                    .execute()
                )
                if updated != 1:
                    raise self._taken_over(session_id)

        await self._in_writer(work, f"mark session {session_id} {status}")

    async def decide(
        self, session_id: str, call_id: str, approve: bool, reason: str, decided_by: str
    ) -> dict[str, Any]:
        """``decide_now`` on the writer thread (for the event loop)."""
        return await self._in_writer(
            lambda: self._decide(session_id, call_id, approve, reason, decided_by), f"decide tool call {call_id}"
        )

    def decide_now(self, session_id: str, call_id: str, approve: bool, reason: str, decided_by: str) -> dict[str, Any]:
        """Approve or deny a pending call (compare and set: only a ``pending_approval`` one); return its record.

        UnknownSessionError, UnknownCallError, CallNotPendingError (already
        decided: the record says by whom and when); AuditError if the database fails.
        """
        try:
            with self.database.connection_context():
                return self._decide(session_id, call_id, approve, reason, decided_by)
        except _DB_ERRORS as exc:
            raise AuditError(f"cannot decide call {call_id} in {self.location}: {one_line(exc)}") from None

    def _decide(self, session_id: str, call_id: str, approve: bool, reason: str, decided_by: str) -> dict[str, Any]:
        with self.database.atomic():
            updated = (
                ToolCallRecord.update(
                    status=CallStatus.APPROVED if approve else CallStatus.DENIED,
                    decided_at=now_iso(),
                    decided_by=decided_by,
                    reason=reason or None,
                )
                .where(
                    (ToolCallRecord.session == session_id)
                    & (ToolCallRecord.call_id == call_id)
                    & (ToolCallRecord.status == CallStatus.PENDING_APPROVAL)
                )
                .execute()
            )
            if updated != 1:
                if not SessionRecord.select().where(SessionRecord.session_id == session_id).exists():
                    raise UnknownSessionError(session_id)
                row = self._tool_call(session_id, call_id)
                by = f" by {row['decided_by']} at {row['decided_at']}" if row["decided_by"] else ""
                raise CallNotPendingError(f"call {call_id} of session {session_id} is {row['status']}{by}, not pending")
            return self._tool_call(session_id, call_id)

    def read_tool_calls(self, session_id: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        """Tool call records, oldest first; of one session and/or in one status (``pending_approval``)."""
        condition: peewee.Expression = ToolCallRecord.id > 0
        if session_id is not None:
            condition &= ToolCallRecord.session == session_id
        if status is not None:
            condition &= ToolCallRecord.status == status
        try:
            with self.database.connection_context():
                query = ToolCallRecord.select().where(condition).order_by(ToolCallRecord.id).dicts()
                return [_call_dict(row) for row in query]
        except _DB_ERRORS as exc:
            raise AuditError(f"cannot read tool calls from {self.location}: {one_line(exc)}") from None

    def session_exists(self, session_id: str) -> bool:
        """Whether the audit knows the session (for the CLI's exit 5)."""
        try:
            with self.database.connection_context():
                return bool(SessionRecord.select().where(SessionRecord.session_id == session_id).exists())
        except _DB_ERRORS as exc:
            raise AuditError(f"cannot read sessions from {self.location}: {one_line(exc)}") from None
    async def token_totals(self, session_id: str) -> TokenTotals:
        """Return the session's LLM tokens so far, per agent (where a resumed session's budget starts from)."""

        def work() -> TokenTotals:
            query = (
                MessageRecord.select(
                    MessageRecord.agent_name,
                    MessageRecord.prompt_tokens,
                    MessageRecord.completion_tokens,
                    MessageRecord.tokens_estimated,
                )
                .where(MessageRecord.session == session_id)
                .order_by(MessageRecord.turn_id)
                .dicts()
            )
            return TokenTotals.from_messages(cast("list[dict[str, Any]]", list(query)))

        return await self._in_writer(work, f"read the tokens of session {session_id}")

    # Synchronous readers for the CLI -------------------------------------------------------------

    def read_token_counts(self) -> dict[str, TokenCount]:
        """Every session's LLM tokens in all (sessions without any counted turn are absent)."""
        try:
            with self.database.connection_context():
                query = (
                    MessageRecord.select(
                        MessageRecord.session,
                        peewee.fn.SUM(MessageRecord.prompt_tokens),
                        peewee.fn.SUM(MessageRecord.completion_tokens),
                        peewee.fn.MAX(peewee.Case(None, [(MessageRecord.tokens_estimated, 1)], 0)),
                        peewee.fn.COUNT(MessageRecord.prompt_tokens),
                    )
                    .where(MessageRecord.prompt_tokens.is_null(False) & MessageRecord.completion_tokens.is_null(False))
                    .group_by(MessageRecord.session)
                    .tuples()
                )
                rows = cast("list[tuple[Any, Any, Any, Any, Any]]", list(query))
        except _DB_ERRORS as exc:
            raise AuditError(f"cannot read token counts from {self.location}: {one_line(exc)}") from None
        return {
            str(session): TokenCount(int(prompt or 0), int(completion or 0), bool(estimated), int(turns))
            for session, prompt, completion, estimated, turns in rows
        }

    def read_sessions(self) -> list[dict[str, Any]]:
        """Every session, newest first."""
        try:
            with self.database.connection_context():
                query = SessionRecord.select().order_by(SessionRecord.start_time.desc()).dicts()
                return cast("list[dict[str, Any]]", list(query))
        except _DB_ERRORS as exc:
            raise AuditError(f"cannot read sessions from {self.location}: {one_line(exc)}") from None

    def read_client_sessions(
        self, client_id: str, *, limit: int, offset: int = 0, statuses: Sequence[str] = ()
    ) -> tuple[list[dict[str, Any]], int]:
        """One page of the sessions ``client_id`` started through the service, newest first, and how many in all."""
        try:
            with self.database.connection_context():
                condition = SessionRecord.client_id == client_id
                if statuses:
                    condition &= SessionRecord.status.in_(list(statuses))
                query = SessionRecord.select().where(condition)
                total = int(query.count())
                page = query.order_by(SessionRecord.start_time.desc(), SessionRecord.session_id.desc())
                rows = cast("list[dict[str, Any]]", list(page.limit(limit).offset(offset).dicts()))
                return rows, total
        except _DB_ERRORS as exc:
            raise AuditError(f"cannot read sessions from {self.location}: {one_line(exc)}") from None

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
            raise AuditError(f"cannot read session {session_id} from {self.location}: {one_line(exc)}") from None


def _call_dict(row: Any) -> dict[str, Any]:
    """Return a ``tool_calls`` row as a dict whose session key is ``session_id`` (as every other reader returns it)."""
    return {("session_id" if key == "session" else key): value for key, value in row.items()}
