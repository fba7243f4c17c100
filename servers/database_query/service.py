"""Database query service: one read-only SELECT per call against the bank database.

Why the authorizer and not keyword filters: SQLite itself reports every action a
statement would take while compiling it, so anything other than reading the
bank's tables with an allowed function (writes, PRAGMA, ATTACH, recursive CTEs,
printf, zeroblob, json_each, ...) is refused by the engine rather than guessed at
from the text. The database is opened read-only, and each value, the result's
rows and bytes, the time and the memory are bounded.

Why child processes (``servers/database_query/worker.py``): one step of SQLite's virtual
machine can run far past any interrupt, so a query that outlives its time is
killed, not asked to stop; that also keeps its memory out of this process and
the event loop free for every other caller. At most
``max_concurrent_queries`` run at once and ``max_waiting_queries`` wait; a
caller beyond that gets RESOURCE_EXHAUSTED at once. Workers are shared fairly
(``servers/database_query/fair_queue.py``): one caller (a token's client) runs
at most ``max_queries_per_caller`` queries and has at most
``max_waiting_per_caller`` waiting, and waiting callers get workers in turn.
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
from prometheus_client import Counter, Histogram
from pydantic import Field, model_validator

from heist_common.config import HeistConfig
from servers.database_query.bank_fixture import ensure_bank_db
from servers.database_query.fair_queue import FairQueue, Refused
from servers.database_query.worker import READY, WorkerLimits, clip, worker_arguments
from servers.runtime import lifecycle
from servers.runtime.lifecycle import ServiceDefinition
from servers.runtime.middleware import CALLER


class Limits(lifecycle.Limits):
    """``services.database_query.limits``: row, time, size, memory and concurrency bounds on queries."""

    max_rows: int = Field(
        200, ge=1, strict=True,
        description="Most rows a query may return; past it the caller is told to add a LIMIT.",
    )
    query_timeout_s: float = Field(
        2.0, gt=0, strict=True,
        description="Longest a query may run (or the caller's deadline, if sooner); also the longest wait for one.",
    )
    max_sql_chars: int = Field(4000, ge=1, strict=True, description="Longest SQL text a query may have.")
    max_value_bytes: int = Field(64 * 1024, ge=1024, strict=True)
    """SQLITE_LIMIT_LENGTH: the longest string or blob any expression may build."""
    max_response_bytes: int = Field(1024 * 1024, ge=1024, strict=True)
    """The biggest result (values plus framing) one query may return."""
    max_concurrent_queries: int = Field(4, ge=1, strict=True)
    """Query worker processes running at once."""
    max_waiting_queries: int = Field(64, ge=0, strict=True)
    """Callers waiting for a free worker; more get RESOURCE_EXHAUSTED at once."""
    max_worker_memory_bytes: int = Field(256 * 1024 * 1024, ge=64 * 1024 * 1024, strict=True)
    """RLIMIT_AS of each query worker process (SQLite's heap is capped at half of it)."""
    max_queries_per_caller: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="Queries one caller (the client of its token) may run at once. Unset: "
        "max_concurrent_queries - 1 (at least 1), so one caller never holds every worker.",
    )
    max_waiting_per_caller: int = Field(
        8,
        ge=0,
        strict=True,
        description="Queries one caller may have waiting for a worker (within max_waiting_queries); "
        "more get RESOURCE_EXHAUSTED at once.",
    )

    @model_validator(mode="after")
    def _share_fits(self) -> Limits:
        if self.max_queries_per_caller is not None and self.max_queries_per_caller > self.max_concurrent_queries:
            raise ValueError(
                f"max_queries_per_caller ({self.max_queries_per_caller}) cannot be more than "
                f"max_concurrent_queries ({self.max_concurrent_queries})"
            )
        return self

    @property
    def caller_share(self) -> int:
        """Workers one caller may hold at once."""
        if self.max_queries_per_caller is not None:
            return self.max_queries_per_caller
        return max(1, self.max_concurrent_queries - 1)

WORKER_SCRIPT = Path(__file__).with_name("worker.py")
STOP_MARGIN_S = 0.05
"""A worker stops its own query this long before the server would kill it, so it usually survives to serve again."""
REPLY_SLACK_BYTES = 1 << 20
"""Framing allowance on top of ``2 * max_response_bytes`` before a worker's reply is treated as broken."""
WORKER_START_TIMEOUT_S = 10.0


class QueryError(Exception):
    """A query that cannot be answered; carries the status code to return (and a refusal reason, if not its code's)."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason


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


def worker_limits(limits: Limits) -> WorkerLimits:
    """Pick the part of the service limits a worker enforces itself."""
    return WorkerLimits(
        max_rows=limits.max_rows,
        max_sql_chars=limits.max_sql_chars,
        max_value_bytes=limits.max_value_bytes,
        max_response_bytes=limits.max_response_bytes,
        max_memory_bytes=limits.max_worker_memory_bytes,
    )


class WorkerGone(QueryError):
    """The worker was dead before it read the request (killed while idle); another worker may be tried."""


class QueryWorker:
    """One child process that runs one query at a time (``servers/database_query/worker.py``)."""

    def __init__(self, process: asyncio.subprocess.Process, max_reply_bytes: int) -> None:
        self.process = process
        self.max_reply_bytes = max_reply_bytes

    @classmethod
    async def spawn(cls, path: Path, limits: Limits) -> QueryWorker:
        """Start a worker for the database at ``path`` and wait until it is ready; UNAVAILABLE if it cannot start.

        Why wait for "ready": Python's start-up (slow on a busy machine) is the
        service's overhead and must not eat the query's time.
        """
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-s", "-B", str(WORKER_SCRIPT), *worker_arguments(path, worker_limits(limits)),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise QueryError(grpc.StatusCode.UNAVAILABLE, f"cannot start a query worker: {exc.strerror}") from None
        worker = cls(process, 2 * limits.max_response_bytes + REPLY_SLACK_BYTES)
        try:
            async with asyncio.timeout(WORKER_START_TIMEOUT_S):
                greeting = await worker.receive()
            if greeting != READY:
                raise QueryError(grpc.StatusCode.UNAVAILABLE, "a query worker did not start properly")
        except (TimeoutError, QueryError, asyncio.CancelledError) as exc:
            worker.kill()
            await asyncio.shield(worker.reap())
            if isinstance(exc, TimeoutError):
                raise QueryError(
                    grpc.StatusCode.UNAVAILABLE, f"a query worker did not start within {WORKER_START_TIMEOUT_S:g} s"
                ) from None
            raise
        return worker

    @property
    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process.returncode is None

    async def run(self, sql: str, budget_s: float) -> tuple[Any, ...]:
        """Send one query and return the worker's reply; raises QueryError if the worker dies or misbehaves."""
        stdin = self.process.stdin
        assert stdin is not None
        payload = marshal.dumps((sql, budget_s))
        try:
            stdin.write(struct.pack(">I", len(payload)) + payload)
            await stdin.drain()
        except ConnectionError as exc:
            died = await self._died()
            raise WorkerGone(died.code, died.message) from exc
        reply = await self.receive()
        if not isinstance(reply, tuple) or len(reply) != 3:
            raise QueryError(grpc.StatusCode.INTERNAL, "the query worker sent a malformed reply")
        return reply

    async def receive(self) -> Any:
        """Read one length-prefixed message; WorkerGone if the worker ended before sending anything."""
        stdout = self.process.stdout
        assert stdout is not None
        try:
            header = await stdout.readexactly(4)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            died = await self._died()
            raise WorkerGone(died.code, died.message) from exc
        (length,) = struct.unpack(">I", header)
        if length > self.max_reply_bytes:
            raise QueryError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the query worker's reply ({length} bytes) is larger than the {self.max_reply_bytes} bytes allowed",
            )
        try:
            return marshal.loads(await stdout.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise await self._died() from exc
        except (ValueError, EOFError, TypeError):
            raise QueryError(grpc.StatusCode.INTERNAL, "the query worker sent a malformed reply") from None

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
    """At most ``max_concurrent_queries`` workers, started on demand and reused, shared fairly between callers."""

    def __init__(self, path: Path, limits: Limits) -> None:
        self.path = path
        self.limits = limits
        self._slots = FairQueue(
            limits.max_concurrent_queries, limits.caller_share, limits.max_waiting_queries,
            limits.max_waiting_per_caller,
        )  # fmt: skip
        self._idle: list[QueryWorker] = []
        self._busy: set[QueryWorker] = set()
        self._starting = 0
        self._spare: asyncio.Task[None] | None = None
        self._reaping: set[asyncio.Task[None]] = set()
        self._closed = False

    async def query(
        self, sql: str, caller_remaining_s: float | None, caller: str = ""
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run one SELECT for ``caller`` (a token's client); (columns, rows) or QueryError.

        Bounds: the caller's share of the workers and of the waiting room;
        waiting for a slot at most ``query_timeout_s``; running at most
        ``query_timeout_s``; everything, worker start-up included, within the
        caller's deadline when there is one.
        """
        if len(sql) > self.limits.max_sql_chars:  # refused here, before it is copied to a worker
            raise QueryError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"sql is {len(sql)} characters long; the limit is {self.limits.max_sql_chars}",
            )
        loop = asyncio.get_running_loop()
        caller_deadline = None if caller_remaining_s is None else loop.time() + caller_remaining_s
        try:
            async with asyncio.timeout_at(caller_deadline), self._slot(caller, self.limits.query_timeout_s):
                try:
                    reply = await self._run(sql, caller_deadline, reuse_idle=True)
                except WorkerGone:  # an idle worker had died (killed, out of memory): one retry on a fresh one
                    reply = await self._run(sql, caller_deadline, reuse_idle=False)
        except TimeoutError:
            raise self._over_time(caller_remaining_s or 0.0, by_caller=True) from None
        kind, first, second = reply
        if kind == "ok":
            return list(first), list(second)
        raise QueryError(status_code(first), str(second))

    def _over_time(self, seconds: float, *, by_caller: bool) -> QueryError:
        bound = "the call's deadline" if by_caller else "query_timeout_s"
        return QueryError(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"query took longer than {seconds:.2g} s ({bound}) and was stopped"
        )

    async def _run(self, sql: str, caller_deadline: float | None, *, reuse_idle: bool) -> tuple[Any, ...]:
        """Run ``sql`` on one worker, which goes back to the idle list only if it answered in time."""
        worker = await self._take_worker(reuse_idle)
        answered = False
        try:
            budget_s, by_caller = self.limits.query_timeout_s, False
            if caller_deadline is not None and caller_deadline - asyncio.get_running_loop().time() < budget_s:
                budget_s, by_caller = caller_deadline - asyncio.get_running_loop().time(), True
            if budget_s <= STOP_MARGIN_S:
                raise self._over_time(budget_s, by_caller=by_caller)
            try:
                async with asyncio.timeout(budget_s):
                    reply = await worker.run(sql, budget_s - STOP_MARGIN_S)
            except TimeoutError:
                raise self._over_time(budget_s, by_caller=by_caller) from None
            answered = True
            if reply[0] == "error" and reply[1] == "DEADLINE_EXCEEDED":
                raise self._over_time(budget_s, by_caller=by_caller)
            return reply
        finally:
            self._give_back(worker, answered)

    @contextlib.asynccontextmanager
    async def _slot(self, caller: str, wait_s: float) -> AsyncIterator[None]:
        """Hold a worker slot within ``caller``'s share; RESOURCE_EXHAUSTED if it may not wait or none frees in time."""
        if self._closed:
            raise QueryError(grpc.StatusCode.UNAVAILABLE, "the database query service is stopping")
        try:
            await self._slots.acquire(caller, wait_s)
        except Refused as refused:
            raise QueryError(grpc.StatusCode.RESOURCE_EXHAUSTED, refused.message, refused.reason) from None
        try:
            yield
        finally:
            self._slots.release(caller)

    async def _take_worker(self, reuse_idle: bool) -> QueryWorker:
        """Take an idle worker, else the spare being started, else a new one (each caller holds a slot)."""
        while reuse_idle:
            while self._idle:
                worker = self._idle.pop()
                if worker.alive:
                    return self._hand_out(worker)
            if self._spare is None:
                break
            await asyncio.shield(self._spare)  # it lands in the idle list (unless another caller takes it first)
        self._starting += 1
        try:
            worker = await QueryWorker.spawn(self.path, self.limits)
        finally:
            self._starting -= 1
        return self._hand_out(worker)

    def _hand_out(self, worker: QueryWorker) -> QueryWorker:
        self._busy.add(worker)
        self._keep_a_spare()
        return worker

    def _keep_a_spare(self) -> None:
        """Start a worker ahead of need, so a caller does not wait for one to start while others run or were killed."""
        if self._closed or self._spare is not None or self._idle:
            return
        if len(self._busy) + self._starting >= self.limits.max_concurrent_queries:
            return
        self._spare = asyncio.get_running_loop().create_task(self._start_spare())

    async def _start_spare(self) -> None:
        try:
            worker = await QueryWorker.spawn(self.path, self.limits)
        except QueryError:
            return  # the next caller spawns its own and reports the error
        finally:
            self._spare = None
        if self._closed:
            worker.kill()
            await worker.reap()
        else:
            self._idle.append(worker)

    def _give_back(self, worker: QueryWorker, reusable: bool) -> None:
        """Keep a worker that answered; kill one that did not (it may still be inside SQLite)."""
        self._busy.discard(worker)
        room = len(self._busy) + len(self._idle) < self.limits.max_concurrent_queries
        if reusable and worker.alive and room and not self._closed:
            self._idle.append(worker)
            return
        worker.kill()
        task = asyncio.get_running_loop().create_task(worker.reap())
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)
        self._keep_a_spare()

    async def close(self) -> None:
        """Kill every worker and wait until they are gone."""
        self._closed = True
        if self._spare is not None:
            await asyncio.shield(self._spare)  # a spare that was starting kills itself
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


QUERY_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_sql",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "limit",  # rows, bytes, memory, or no worker free
    grpc.StatusCode.DEADLINE_EXCEEDED: "timeout",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
}
"""``heist_database_query_refused_total{reason}``: why a Query was refused, by its status code (``caller_share``:
the caller's own share of the workers or of the waiting room was full; ``other``: anything else)."""


class DatabaseQueryServicer(pb_grpc.DatabaseQueryServiceServicer):
    """Serves heist.database_query.v1.DatabaseQueryService."""

    def __init__(self, path: Path, limits: Limits) -> None:
        self._path = path
        self.pool = QueryWorkerPool(path, limits)
        self.seconds = Histogram(
            "heist_database_query_seconds", "Time per Query call (a worker's wait and run).", buckets=QUERY_SECONDS,
            registry=None,
        )  # fmt: skip
        self.refused = Counter("heist_database_query_refused", "Query calls refused, by reason.", ("reason",),
                               registry=None)  # fmt: skip

    async def Query(self, request: pb.QueryRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.QueryResponse:
        """Run the caller's single SELECT."""
        started = time.perf_counter()
        claims = CALLER.get()
        try:
            columns, rows = await self.pool.query(
                request.sql, caller_time_remaining(context), claims.client_id if claims is not None else ""
            )
        except QueryError as exc:
            self.refused.labels(exc.reason or REFUSALS.get(exc.code, "other")).inc()
            await context.abort(exc.code, clip(exc.message, 600))
        finally:
            self.seconds.observe(time.perf_counter() - started)
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


def service_definition(config: HeistConfig, limits: Limits) -> ServiceDefinition:
    """Build the database servicer (and the bank database, on first start); stopping it stops the workers."""
    servicer = DatabaseQueryServicer(ensure_bank_db(config), limits)
    collectors = (servicer.seconds, servicer.refused)
    return ServiceDefinition("database_query", servicer, on_stop=servicer.pool.close, collectors=collectors)

