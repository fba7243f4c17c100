"""Database query service: one read-only SELECT per call against the bank database.

Why the authorizer and not keyword filters: SQLite itself reports every action a
statement would take while compiling it, so anything other than reading
(writes, PRAGMA, ATTACH, recursive CTEs, ...) is refused by the engine rather
than guessed at from the text. The database is also opened read-only, rows and
time are bounded, and the work runs on a thread so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2
from heist.database_query.v1 import database_query_pb2 as pb
from heist.database_query.v1 import database_query_pb2_grpc as pb_grpc
from pydantic import Field

from heist_common.config import HeistConfig
from servers import lifecycle
from servers.bank_db import ensure_bank_db
from servers.lifecycle import ServiceDefinition


class Limits(lifecycle.Limits):
    """``services.database_query.limits``: row, time and size bounds on one SQL query."""

    max_rows: int = Field(200, ge=1, strict=True)
    query_timeout_s: float = Field(2.0, gt=0, strict=True)
    max_sql_chars: int = Field(4000, ge=1, strict=True)


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
PROGRESS_EVERY_INSTRUCTIONS = 10_000
MAX_VALUE_BYTES = 1_000_000
SINGLE_SELECT = "only a single SELECT statement is allowed"


class QueryError(Exception):
    """A query that cannot be answered; carries the status code to return."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def first_statement(sql: str) -> str:
    """Return the only statement in ``sql``; QueryError if anything but whitespace follows it."""
    for index, char in enumerate(sql):
        if char == ";" and sqlite3.complete_statement(sql[: index + 1]):
            rest = sql[index + 1 :].strip()
            if rest:
                raise QueryError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"{SINGLE_SELECT}: found more text after the first ';'"
                )
            return sql[:index]
    return sql


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


class BankDatabase:
    """Read-only access to the bank database file, one connection per query."""

    def __init__(self, path: Path, limits: Limits) -> None:
        self.path = path
        self.limits = limits

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
        connection.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, max(self.limits.max_sql_chars * 2, 1000))
        return connection

    def query(self, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run one SELECT; return (columns, rows) or raise QueryError."""
        if not sql.strip():
            raise QueryError(grpc.StatusCode.INVALID_ARGUMENT, "sql is required")
        if len(sql) > self.limits.max_sql_chars:
            raise QueryError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"sql is {len(sql)} characters long; the limit is {self.limits.max_sql_chars}",
            )
        if "\x00" in sql:
            raise QueryError(grpc.StatusCode.INVALID_ARGUMENT, "sql contains a NUL character")
        statement = first_statement(sql)
        denied: list[str] = []

        def authorize(action: int, *_: Any) -> int:
            if action in ALLOWED_ACTIONS:
                return sqlite3.SQLITE_OK
            denied.append(ACTION_NAMES.get(action, str(action)))
            return sqlite3.SQLITE_DENY

        deadline = time.monotonic() + self.limits.query_timeout_s
        timed_out = False

        def progress() -> int:
            nonlocal timed_out
            if time.monotonic() > deadline:
                timed_out = True
                return 1
            return 0

        try:
            connection = self._connect()
        except sqlite3.Error as exc:
            raise QueryError(grpc.StatusCode.UNAVAILABLE, f"bank database unavailable: {exc}") from None
        try:
            connection.set_authorizer(authorize)
            connection.set_progress_handler(progress, PROGRESS_EVERY_INSTRUCTIONS)
            cursor = connection.execute(statement)
            rows = cursor.fetchmany(self.limits.max_rows + 1)
            columns = [column[0] for column in cursor.description or ()]
        except (sqlite3.Error, ValueError) as exc:
            if timed_out:
                raise QueryError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"query took longer than {self.limits.query_timeout_s:g} s",
                ) from None
            if denied:
                raise QueryError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"{SINGLE_SELECT}: {', '.join(denied)} is not permitted"
                ) from None
            if isinstance(exc, sqlite3.ProgrammingError) and "one statement" in str(exc):
                raise QueryError(grpc.StatusCode.INVALID_ARGUMENT, f"{SINGLE_SELECT}: {exc}") from None
            raise QueryError(grpc.StatusCode.INVALID_ARGUMENT, f"SQL error: {exc}") from None
        finally:
            connection.close()
        if denied:
            raise QueryError(grpc.StatusCode.INVALID_ARGUMENT, f"{SINGLE_SELECT}: {', '.join(denied)} is not permitted")
        if not columns:
            raise QueryError(grpc.StatusCode.INVALID_ARGUMENT, f"{SINGLE_SELECT}: the statement returns no columns")
        if len(rows) > self.limits.max_rows:
            raise QueryError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"query returned more than {self.limits.max_rows} rows; add a LIMIT",
            )
        return columns, rows

    def tables(self) -> list[tuple[str, list[tuple[str, str]]]]:
        """Return every table with its (column, declared type) pairs, sorted by table name."""
        connection = self._connect()
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


class DatabaseQueryServicer(pb_grpc.DatabaseQueryServiceServicer):
    """Serves heist.database_query.v1.DatabaseQueryService."""

    def __init__(self, database: BankDatabase) -> None:
        self._database = database

    async def Query(self, request: pb.QueryRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.QueryResponse:
        """Run the caller's single SELECT."""
        try:
            columns, rows = await asyncio.to_thread(self._database.query, request.sql)
        except QueryError as exc:
            await context.abort(exc.code, exc.message)
        return pb.QueryResponse(
            columns=columns, rows=[pb.Row(values=[to_value(value) for value in row]) for row in rows]
        )

    async def ListTables(
        self, request: pb.ListTablesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListTablesResponse:
        """List tables and columns."""
        try:
            tables = await asyncio.to_thread(self._database.tables)
        except sqlite3.Error as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"bank database unavailable: {exc}")
        return pb.ListTablesResponse(
            tables=[
                pb.Table(name=name, columns=[pb.Column(name=column, type=kind) for column, kind in columns])
                for name, columns in tables
            ]
        )


def service_definition(config: HeistConfig, limits: Limits) -> ServiceDefinition:
    """Build the database servicer (and the bank database, on first start)."""
    return ServiceDefinition("database_query", DatabaseQueryServicer(BankDatabase(ensure_bank_db(config), limits)))


if __name__ == "__main__":
    raise SystemExit(lifecycle.main(__spec__))
