"""The SQL half of the database_query service, run in a child process per concurrent query.

Why a process and not a thread: SQLite looks at its interrupt flag and progress
handler only between loop iterations of its virtual machine, and one iteration
can run for many seconds (one row computing twenty ``trim(x, y)`` over long
values ran 14 s after a 0.3 s interrupt; a big sort is one step too). Nothing
can stop a thread there, but a process can be killed at the deadline, and its
memory is capped by ``RLIMIT_AS``, so the server's own memory and event loop
stay untouched whatever one query does.

Only the standard library is imported, so a fresh worker starts fast;
it dies with the server (PR_SET_PDEATHSIG), even when that is ``kill -9``.
Status codes travel as gRPC status *names* (``"INVALID_ARGUMENT"``); the server
maps them to ``grpc.StatusCode``.

Protocol on stdin/stdout, one request at a time, each message a 4-byte
big-endian length and a ``marshal`` payload:
first ``("ready",)`` from the worker once it runs; then per request
``(sql, budget_s)`` a reply ``("ok", columns, rows)`` or
``("error", status_name, message)``. End of stdin ends the worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import marshal
import os
import resource
import signal
import sqlite3
import struct
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

ALLOWED_FUNCTIONS = frozenset(
    {
        # aggregates
        "count", "sum", "total", "avg", "min", "max", "group_concat",
        # numbers
        "abs", "round", "sign", "ceil", "ceiling", "floor", "trunc", "mod", "pow", "power", "sqrt", "exp", "ln",
        "log", "log10", "log2", "pi",
        # text (every result is capped by SQLITE_LIMIT_LENGTH; time by the deadline)
        "length", "lower", "upper", "substr", "substring", "trim", "ltrim", "rtrim", "instr", "replace", "like",
        "glob",
        # NULLs and types
        "coalesce", "ifnull", "nullif", "iif", "typeof",
        # dates and times
        "date", "time", "datetime", "julianday", "strftime", "unixepoch", "current_date", "current_time",
        "current_timestamp",
        # window functions
        "row_number", "rank", "dense_rank", "percent_rank", "cume_dist", "ntile", "lag", "lead", "first_value",
        "last_value", "nth_value",
        # query planner hints (no effect on results)
        "likely", "unlikely", "likelihood",
    }
)
"""SQL functions a bank-data analyst needs. Everything else (printf/format, zeroblob, randomblob, json, fts,
load_extension, sqlite_*) is refused while the statement compiles: those build huge values from a few
characters or reach outside the bank's tables."""

ALLOWED_ACTIONS = frozenset({sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION})
_AUTHORIZER_ACTIONS = (
    "CREATE_INDEX", "CREATE_TABLE", "CREATE_TEMP_INDEX", "CREATE_TEMP_TABLE", "CREATE_TEMP_TRIGGER",
    "CREATE_TEMP_VIEW", "CREATE_TRIGGER", "CREATE_VIEW", "DELETE", "DROP_INDEX", "DROP_TABLE",
    "DROP_TEMP_INDEX", "DROP_TEMP_TABLE", "DROP_TEMP_TRIGGER", "DROP_TEMP_VIEW", "DROP_TRIGGER", "DROP_VIEW",
    "INSERT", "PRAGMA", "READ", "SELECT", "TRANSACTION", "UPDATE", "ATTACH", "DETACH", "ALTER_TABLE",
    "REINDEX", "ANALYZE", "CREATE_VTABLE", "DROP_VTABLE", "FUNCTION", "SAVEPOINT", "RECURSIVE",
)
ACTION_NAMES = {
    getattr(sqlite3, f"SQLITE_{name}"): name.replace("_", " ")
    for name in _AUTHORIZER_ACTIONS
    if hasattr(sqlite3, f"SQLITE_{name}")
}
SCHEMA_TABLE = "sqlite_master"
SINGLE_SELECT = "only a single SELECT statement is allowed"
PROGRESS_EVERY_INSTRUCTIONS = 1_000
MAX_RESULT_COLUMNS = 100
"""SQLITE_LIMIT_COLUMN: result columns per SELECT (the widest bank table has 9)."""
MAX_ECHO_CHARS = 200
"""Caller text (SQL fragments, names) quoted in a status message is cut to this many characters."""
VALUE_OVERHEAD_BYTES = 3
"""Approximate protobuf framing per value, counted against ``max_response_bytes``."""
READY = ("ready",)
"""The first message of a worker: it has started and applied its limits."""
WORKER_STATUS_ERROR = 3
PR_SET_PDEATHSIG = 1
"""Exit status of a worker whose configuration or database cannot be used."""


@dataclass(frozen=True)
class WorkerLimits:
    """What one query may use; passed to the worker as JSON on its command line."""

    max_rows: int
    max_sql_chars: int
    max_value_bytes: int
    max_response_bytes: int
    max_memory_bytes: int


class QueryFailure(Exception):
    """A query that cannot be answered: the gRPC status name and a message that says why."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def clip(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """Cut caller-controlled text quoted in a status message, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def first_statement(sql: str) -> str:
    """Return the only statement in ``sql``; QueryFailure if anything but whitespace follows it."""
    for index, char in enumerate(sql):
        if char == ";" and sqlite3.complete_statement(sql[: index + 1]):
            if sql[index + 1 :].strip():
                raise QueryFailure("INVALID_ARGUMENT", f"{SINGLE_SELECT}: found more text after the first ';'")
            return sql[:index]
    return sql


def value_size(value: Any) -> int:
    """Bytes one SQLite value adds to the response (close to its protobuf size)."""
    if isinstance(value, str):
        return (len(value) if value.isascii() else len(value.encode("utf-8", "replace"))) + VALUE_OVERHEAD_BYTES
    if isinstance(value, bytes):
        return len(value) + VALUE_OVERHEAD_BYTES
    return 9 + VALUE_OVERHEAD_BYTES if value is not None else VALUE_OVERHEAD_BYTES


def decode_text(raw: bytes) -> str:
    """SQLite text that is not valid UTF-8 (``CAST(x'ff' AS TEXT)``) becomes U+FFFD instead of an error."""
    return raw.decode("utf-8", "replace")


class Refusals:
    """What the authorizer refused while the statement compiled, in the order SQLite asked."""

    def __init__(self, readable_tables: frozenset[str]) -> None:
        self.readable_tables = readable_tables
        self.actions: list[str] = []
        self.reasons: list[str] = []

    def authorize(self, action: int, arg1: str | None, arg2: str | None, *_: Any) -> int:
        """sqlite3 authorizer: reading the bank's tables and calling allowed functions only."""
        if action == sqlite3.SQLITE_SELECT:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_READ:
            if arg1 in self.readable_tables:
                return sqlite3.SQLITE_OK
            self._refuse(f"reading {clip(str(arg1), 60)} is not permitted (only the bank's tables can be read)")
        elif action == sqlite3.SQLITE_FUNCTION:
            if (arg2 or "").lower() in ALLOWED_FUNCTIONS:
                return sqlite3.SQLITE_OK
            self._refuse(
                f"function {clip(str(arg2), 60)}() is not permitted; allowed are aggregates (count, sum, avg, min, "
                "max, group_concat), numbers (abs, round, ...), text (length, lower, upper, substr, trim, instr, "
                "replace), coalesce/ifnull/nullif/iif, date and time functions and window functions"
            )
        elif action == sqlite3.SQLITE_UPDATE and arg1 == SCHEMA_TABLE:
            self._refuse(
                "table-valued functions and virtual tables (json_each, pragma_*, dbstat, ...) are not permitted"
            )
        else:
            self.actions.append(ACTION_NAMES.get(action, str(action)))
        return sqlite3.SQLITE_DENY

    def _refuse(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)

    def failure(self) -> QueryFailure | None:
        """Return the INVALID_ARGUMENT to answer with, if anything was refused."""
        if self.actions:
            return QueryFailure("INVALID_ARGUMENT", f"{SINGLE_SELECT}: {', '.join(self.actions)} is not permitted")
        if self.reasons:
            return QueryFailure("INVALID_ARGUMENT", "; ".join(self.reasons[:3]))
        return None


class BankQueries:
    """Runs single read-only SELECTs against the bank database, each within its limits."""

    def __init__(self, path: Path, limits: WorkerLimits) -> None:
        self.path = path
        self.limits = limits
        self._readable_tables: frozenset[str] | None = None

    def connect(self) -> sqlite3.Connection:
        """Open the database read-only with SQLite's own size limits set for caller SQL."""
        connection = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
        connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, self.limits.max_value_bytes)
        connection.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, max(self.limits.max_sql_chars * 4, 1000))
        connection.setlimit(sqlite3.SQLITE_LIMIT_COLUMN, MAX_RESULT_COLUMNS)
        connection.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        connection.execute("PRAGMA temp_store = MEMORY")  # sorts spill into capped memory, not onto the disk
        connection.text_factory = decode_text
        return connection

    def readable_tables(self, connection: sqlite3.Connection) -> frozenset[str]:
        """Return the bank's tables (and the schema table), read once per worker before any caller SQL runs."""
        if self._readable_tables is None:
            names = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            self._readable_tables = frozenset({*names, SCHEMA_TABLE})
        return self._readable_tables

    def check(self, sql: str) -> str:
        """Return the statement to run, or raise QueryFailure for input refused before SQLite sees it."""
        if not sql.strip():
            raise QueryFailure("INVALID_ARGUMENT", "sql is required")
        if len(sql) > self.limits.max_sql_chars:
            raise QueryFailure(
                "INVALID_ARGUMENT", f"sql is {len(sql)} characters long; the limit is {self.limits.max_sql_chars}"
            )
        if "\x00" in sql:
            raise QueryFailure("INVALID_ARGUMENT", "sql contains a NUL character")
        return first_statement(sql)

    def query(self, sql: str, budget_s: float) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run one SELECT within ``budget_s`` seconds; return (columns, rows) or raise QueryFailure."""
        statement = self.check(sql)
        try:
            connection = self.connect()
            refusals = Refusals(self.readable_tables(connection))
        except sqlite3.Error as exc:
            raise QueryFailure("UNAVAILABLE", f"bank database unavailable: {exc}") from None
        deadline = time.monotonic() + budget_s
        timed_out = False

        def over_time() -> int:
            nonlocal timed_out
            timed_out = timed_out or time.monotonic() > deadline
            return 1 if timed_out else 0

        try:
            connection.set_authorizer(refusals.authorize)
            connection.set_progress_handler(over_time, PROGRESS_EVERY_INSTRUCTIONS)
            cursor = connection.execute(statement)
            columns = [column[0] for column in cursor.description or ()]
            rows = self._fetch(cursor, columns)
        except (sqlite3.Error, ValueError, OverflowError) as exc:
            raise self._failure(exc, refusals, timed_out, budget_s) from None
        except MemoryError:
            raise QueryFailure(
                "RESOURCE_EXHAUSTED", "the query needs more memory than a query worker may use "
                f"(max_worker_memory_bytes: {self.limits.max_memory_bytes})"
            ) from None
        finally:
            connection.close()
        failure = refusals.failure()
        if failure is not None:
            raise failure
        if not columns:
            raise QueryFailure("INVALID_ARGUMENT", f"{SINGLE_SELECT}: the statement returns no columns")
        return columns, rows

    def _fetch(self, cursor: sqlite3.Cursor, columns: list[str]) -> list[tuple[Any, ...]]:
        """Read rows one at a time, stopping as soon as the row or byte cap is passed."""
        limits = self.limits
        size = sum(len(name) + VALUE_OVERHEAD_BYTES for name in columns)
        rows: list[tuple[Any, ...]] = []
        for row in cursor:
            if len(rows) == limits.max_rows:
                raise QueryFailure(
                    "RESOURCE_EXHAUSTED", f"query returned more than {limits.max_rows} rows; add a LIMIT"
                )
            size += sum(value_size(value) for value in row) + VALUE_OVERHEAD_BYTES
            if size > limits.max_response_bytes:
                raise QueryFailure(
                    "RESOURCE_EXHAUSTED",
                    f"the result would be larger than {limits.max_response_bytes} bytes (max_response_bytes) after "
                    f"{len(rows)} rows; select fewer or shorter columns or add a LIMIT",
                )
            rows.append(row)
        return rows

    def _failure(self, exc: Exception, refusals: Refusals, timed_out: bool, budget_s: float) -> QueryFailure:
        """Name what went wrong: time, a refused action or function, a size limit, or the SQL itself."""
        if timed_out:
            return QueryFailure("DEADLINE_EXCEEDED", f"query took longer than {budget_s:.2g} s and was stopped")
        refused = refusals.failure()
        if refused is not None:
            return refused
        text = str(exc)
        if isinstance(exc, sqlite3.ProgrammingError) and "one statement" in text:
            return QueryFailure("INVALID_ARGUMENT", f"{SINGLE_SELECT}: {text}")
        if "too big" in text:
            return QueryFailure(
                "RESOURCE_EXHAUSTED",
                f"a value would be longer than {self.limits.max_value_bytes} bytes (max_value_bytes): {text}",
            )
        if "too many columns" in text:
            return QueryFailure("INVALID_ARGUMENT", f"at most {MAX_RESULT_COLUMNS} columns: {clip(text)}")
        if isinstance(exc, sqlite3.OperationalError) and text == "out of memory":
            return QueryFailure(
                "RESOURCE_EXHAUSTED", "the query needs more memory than a query worker may use "
                f"(max_worker_memory_bytes: {self.limits.max_memory_bytes})"
            )
        if isinstance(exc, OverflowError | ValueError):
            return QueryFailure("INVALID_ARGUMENT", f"cannot return a value: {clip(text)}")
        return QueryFailure("INVALID_ARGUMENT", f"SQL error: {clip(text)}")


def read_message(stream: BinaryIO) -> Any:
    """One length-prefixed marshal message from ``stream``; None at end of input."""
    header = stream.read(4)
    if len(header) < 4:
        return None
    (length,) = struct.unpack(">I", header)
    payload = stream.read(length)
    if len(payload) < length:
        return None
    return marshal.loads(payload)


def write_message(stream: BinaryIO, message: Any) -> None:
    """Write one length-prefixed marshal message and flush it."""
    payload = marshal.dumps(message)
    stream.write(struct.pack(">I", len(payload)) + payload)
    stream.flush()


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this worker when the server dies (even by ``kill -9``), instead of after its query."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the server was already gone before the request took effect
        raise SystemExit(WORKER_STATUS_ERROR)


def confine(limits: WorkerLimits) -> None:
    """Cap this process: address space, files it may write (none) and open files; SQLite's heap below that."""
    resource.setrlimit(resource.RLIMIT_AS, (limits.max_memory_bytes, limits.max_memory_bytes))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write to a file fails instead of killing the worker
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    heap = sqlite3.connect(":memory:")
    heap.execute(f"PRAGMA hard_heap_limit = {limits.max_memory_bytes // 2}")  # process-wide
    heap.close()


def answer(queries: BankQueries, sql: str, budget_s: float) -> tuple[Any, ...]:
    """Build the reply to one request; never raises, so one bad query cannot end the worker."""
    try:
        columns, rows = queries.query(sql, budget_s)
    except QueryFailure as failure:
        return ("error", failure.status, failure.message)
    except MemoryError:
        return ("error", "RESOURCE_EXHAUSTED", "the query needs more memory than a query worker may use")
    except Exception:  # a bug here, not the caller's input: say so, keep the traceback in the service log
        traceback.print_exc(file=sys.stderr)
        return ("error", "INTERNAL", "the query worker failed unexpectedly (see the service log)")
    return ("ok", columns, rows)


def serve(queries: BankQueries, requests: BinaryIO, replies: BinaryIO) -> None:
    """Answer requests until end of input."""
    while True:
        request = read_message(requests)
        if request is None:
            return
        sql, budget_s = request
        write_message(replies, answer(queries, str(sql), float(budget_s)))


def main(argv: list[str]) -> int:
    """``worker.py DATABASE_PATH LIMITS_JSON SERVER_PID``: serve queries on stdin/stdout."""
    if len(argv) != 3:
        print("usage: worker.py DATABASE_PATH LIMITS_JSON SERVER_PID", file=sys.stderr)
        return WORKER_STATUS_ERROR
    limits = WorkerLimits(**json.loads(argv[1]))
    die_with_parent(int(argv[2]))
    confine(limits)
    write_message(sys.stdout.buffer, READY)
    serve(BankQueries(Path(argv[0]), limits), sys.stdin.buffer, sys.stdout.buffer)
    return 0


def worker_arguments(path: Path, limits: WorkerLimits) -> list[str]:
    """Command-line arguments (after the script) that start a worker for ``path`` with ``limits``."""
    return [str(path), json.dumps(asdict(limits)), str(os.getpid())]


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
