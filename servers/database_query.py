"""Database query service: one read-only SELECT per call against the bank database.

Why the authorizer and not keyword filters: SQLite itself reports every action a
statement would take while compiling it, so anything other than reading the
bank's tables with an allowed function (writes, PRAGMA, ATTACH, recursive CTEs,
printf, zeroblob, json_each, ...) is refused by the engine rather than guessed at
from the text. The database is opened read-only, and each value, the result's
rows and bytes, the time and the memory are bounded.

Why child processes (``servers/query_worker.py``): one step of SQLite's virtual
machine can run far past any interrupt, so a query that outlives its time is
killed, not asked to stop; that also keeps its memory out of this process and
the event loop free for every other caller. At most
``max_concurrent_queries`` run at once and ``max_waiting_queries`` wait; a
caller beyond that gets RESOURCE_EXHAUSTED at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import marshal
import math
import sqlite3
import struct
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2
from heist.database_query.v1 import database_query_pb2 as pb
from heist.database_query.v1 import database_query_pb2_grpc as pb_grpc

from servers import bootstrap
from servers.bank_db import ensure_bank_db
from servers.bootstrap import ServiceDefinition
from servers.query_worker import WorkerLimits, clip, worker_arguments
from servers.request_guard import guarded_registration
from servers.settings import DatabaseQueryLimits, MeshSettings

WORKER_SCRIPT = Path(__file__).with_name("query_worker.py")
STOP_MARGIN_S = 0.05
"""A worker stops its own query this long before the server would kill it, so it usually survives to serve again."""
REPLY_SLACK_BYTES = 1 << 20
"""Framing allowance on top of ``2 * max_response_bytes`` before a worker's reply is treated as broken."""


class QueryError(Exception):
    """A query that cannot be answered; carries the status code to return."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def to_value(value: Any) -> pb.Value:
    """Convert one SQLite value to its typed proto form."""
    if value is None:
        return pb.Value(null_value=struct_pb2.NULL_VALUE)
    if isinstance(value, int):
        return pb.Value(int_value=value)
    if isinstance(value, float):
        return pb.Value(real_value=value)
    if isinstance(value, bytes):
        return pb.Value(blob_value=value)
    return pb.Value(text_value=str(value))


def status_code(name: object) -> grpc.StatusCode:
    """Map a status name from a worker to grpc.StatusCode (INTERNAL for anything else: a worker bug)."""
    if isinstance(name, str) and name in grpc.StatusCode.__members__:
        return grpc.StatusCode[name]
    return grpc.StatusCode.INTERNAL


def worker_limits(limits: DatabaseQueryLimits) -> WorkerLimits:
    """Pick the part of the service limits a worker enforces itself."""
    return WorkerLimits(
        max_rows=limits.max_rows,
        max_sql_chars=limits.max_sql_chars,
        max_value_bytes=limits.max_value_bytes,
        max_response_bytes=limits.max_response_bytes,
        max_memory_bytes=limits.max_worker_memory_bytes,
    )


class QueryWorker:
    """One child process that runs one query at a time (``servers/query_worker.py``)."""

    def __init__(self, process: asyncio.subprocess.Process, max_reply_bytes: int) -> None:
        self.process = process
        self.max_reply_bytes = max_reply_bytes

    @classmethod
    async def spawn(cls, path: Path, limits: DatabaseQueryLimits) -> QueryWorker:
        """Start a worker for the database at ``path``; UNAVAILABLE if the OS refuses."""
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-s", "-B", str(WORKER_SCRIPT), *worker_arguments(path, worker_limits(limits)),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise QueryError(grpc.StatusCode.UNAVAILABLE, f"cannot start a query worker: {exc.strerror}") from None
        return cls(process, 2 * limits.max_response_bytes + REPLY_SLACK_BYTES)

    @property
    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process.returncode is None

    async def run(self, sql: str, budget_s: float) -> tuple[Any, ...]:
        """Send one query and return the worker's reply; raises QueryError if the worker dies or misbehaves."""
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        payload = marshal.dumps((sql, budget_s))
        try:
            stdin.write(struct.pack(">I", len(payload)) + payload)
            await stdin.drain()
            (length,) = struct.unpack(">I", await stdout.readexactly(4))
            if length > self.max_reply_bytes:
                raise QueryError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the query worker's reply ({length} bytes) "
                                 f"is larger than the {self.max_reply_bytes} bytes allowed")
            reply = marshal.loads(await stdout.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise await self._died() from exc
        if not isinstance(reply, tuple) or len(reply) != 3:
            raise QueryError(grpc.StatusCode.INTERNAL, "the query worker sent a malformed reply")
        return reply

    async def _died(self) -> QueryError:
        """Say why the worker went away mid-query (a signal is almost always the memory limit)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self.process.wait()
        code = self.process.returncode
        if code is not None and code < 0:
            return QueryError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"the query worker was ended by signal {-code} (memory limit?)"
            )
        return QueryError(grpc.StatusCode.UNAVAILABLE, f"the query worker exited unexpectedly (status {code})")

    def kill(self) -> None:
        """SIGKILL: the only way to stop SQLite in the middle of one long step."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def reap(self) -> None:
        """Wait for a killed worker to be gone (no zombies, pipes closed)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await self.process.wait()


class QueryWorkerPool:
    """At most ``max_concurrent_queries`` workers, started on demand and reused; waiting callers are bounded."""

    def __init__(self, path: Path, limits: DatabaseQueryLimits) -> None:
        self.path = path
        self.limits = limits
        self._slots: asyncio.Semaphore | None = None
        self._idle: list[QueryWorker] = []
        self._busy: set[QueryWorker] = set()
        self._waiting = 0
        self._reaping: set[asyncio.Task[None]] = set()
        self._closed = False

    async def query(self, sql: str, caller_remaining_s: float | None) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run one SELECT within ``query_timeout_s`` and the caller's deadline; (columns, rows) or QueryError."""
        if len(sql) > self.limits.max_sql_chars:  # refused here, before it is copied to a worker
            raise QueryError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"sql is {len(sql)} characters long; the limit is {self.limits.max_sql_chars}",
            )
        started = time.monotonic()
        limit_s = self.limits.query_timeout_s
        if caller_remaining_s is not None:
            limit_s = min(limit_s, caller_remaining_s)
        over_time = QueryError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"query took longer than {limit_s:.2g} s ("
            + ("query_timeout_s" if limit_s >= self.limits.query_timeout_s else "the call's deadline")
            + ") and was stopped",
        )
        async with self._slot(limit_s):
            remaining_s = limit_s - (time.monotonic() - started)
            if remaining_s <= STOP_MARGIN_S:
                raise over_time
            worker = await self._take_worker()
            reusable = False
            try:
                async with asyncio.timeout(remaining_s):
                    reply = await worker.run(sql, remaining_s - STOP_MARGIN_S)
                reusable = True
            except TimeoutError:
                raise over_time from None
            finally:
                self._give_back(worker, reusable)
        kind, first, second = reply
        if kind == "ok":
            return list(first), list(second)
        if first == "DEADLINE_EXCEEDED":
            raise over_time
        raise QueryError(status_code(first), str(second))

    @contextlib.asynccontextmanager
    async def _slot(self, wait_s: float) -> AsyncIterator[None]:
        """Hold one of the ``max_concurrent_queries`` slots; RESOURCE_EXHAUSTED if none frees up in time."""
        if self._closed:
            raise QueryError(grpc.StatusCode.UNAVAILABLE, "the database query service is stopping")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limits.max_concurrent_queries)
        slots = self._slots
        running, capacity = self.limits.max_concurrent_queries, self.limits.max_waiting_queries
        if slots.locked() and self._waiting >= capacity:
            raise QueryError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many queries: {running} running and {self._waiting} waiting "
                "(max_concurrent_queries, max_waiting_queries); try again shortly",
            )
        self._waiting += 1
        try:
            async with asyncio.timeout(wait_s):
                await slots.acquire()
        except TimeoutError:
            raise QueryError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"all {running} query slots (max_concurrent_queries) stayed busy for {wait_s:.2g} s; try again",
            ) from None
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            slots.release()

    async def _take_worker(self) -> QueryWorker:
        while self._idle:
            worker = self._idle.pop()
            if worker.alive:
                self._busy.add(worker)
                return worker
        worker = await QueryWorker.spawn(self.path, self.limits)
        self._busy.add(worker)
        return worker

    def _give_back(self, worker: QueryWorker, reusable: bool) -> None:
        """Keep a worker that answered; kill one that did not (it may still be inside SQLite)."""
        self._busy.discard(worker)
        if reusable and worker.alive and not self._closed:
            self._idle.append(worker)
            return
        worker.kill()
        task = asyncio.get_running_loop().create_task(worker.reap())
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    async def close(self) -> None:
        """Kill every worker and wait until they are gone."""
        self._closed = True
        workers = [*self._idle, *self._busy]
        self._idle.clear()
        for worker in workers:
            worker.kill()
        await asyncio.gather(*(worker.reap() for worker in workers), *self._reaping)


def list_tables(path: Path) -> list[tuple[str, list[tuple[str, str]]]]:
    """Return every table with its (column, declared type) pairs, sorted by table name."""
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        names = [
            row[0]
            for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        return [
            (name, [(row[1], row[2]) for row in connection.execute("SELECT * FROM pragma_table_info(?)", (name,))])
            for name in names
        ]
    finally:
        connection.close()


def caller_time_remaining(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    """Seconds until the caller's deadline, or None when the call has none."""
    remaining = context.time_remaining()
    if remaining is None or not math.isfinite(remaining) or remaining > 1e9:
        return None
    return max(float(remaining), 0.0)


class DatabaseQueryServicer(pb_grpc.DatabaseQueryServiceServicer):
    """Serves heist.database_query.v1.DatabaseQueryService."""

    def __init__(self, path: Path, limits: DatabaseQueryLimits) -> None:
        self._path = path
        self.pool = QueryWorkerPool(path, limits)

    async def Query(self, request: pb.QueryRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.QueryResponse:
        """Run the caller's single SELECT."""
        try:
            columns, rows = await self.pool.query(request.sql, caller_time_remaining(context))
        except QueryError as exc:
            await context.abort(exc.code, clip(exc.message, 600))
        return pb.QueryResponse(
            columns=columns, rows=[pb.Row(values=[to_value(value) for value in row]) for row in rows]
        )

    async def ListTables(
        self, request: pb.ListTablesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListTablesResponse:
        """List tables and columns."""
        try:
            tables = await asyncio.to_thread(list_tables, self._path)
        except sqlite3.Error as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"bank database unavailable: {exc}")
        return pb.ListTablesResponse(
            tables=[
                pb.Table(name=name, columns=[pb.Column(name=column, type=kind) for column, kind in columns])
                for name, columns in tables
            ]
        )


def service_definition(settings: MeshSettings) -> ServiceDefinition:
    """Bind the database servicer to the bootstrap (builds the bank database on first start)."""
    servicer = DatabaseQueryServicer(ensure_bank_db(settings), settings.limits.database_query)
    descriptor = pb.DESCRIPTOR.services_by_name["DatabaseQueryService"]
    return ServiceDefinition(
        name="database_query",
        descriptor=descriptor,
        servicer=servicer,
        register=guarded_registration(descriptor, pb),
        on_stop=servicer.pool.close,
    )


if __name__ == "__main__":
    raise SystemExit(bootstrap.main("database_query", service_definition))
