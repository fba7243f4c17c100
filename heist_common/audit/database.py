"""Opening an audit database from a URL: SQLite tuned for several writers, PostgreSQL, and in-place migrations.

Both engines get the same schema and the same per-turn transactions; only
SQLite gets pragmas and ``BEGIN IMMEDIATE`` (PostgreSQL locks rows, not the
file, so concurrent writers need nothing special there).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import peewee

from heist_common.audit.schema import MODELS
from heist_common.layout import make_private

BUSY_TIMEOUT_MS = 5000


class AuditError(RuntimeError):
    """The audit database cannot be opened or written (read-only, disk full, unreachable)."""


class UnknownSessionError(LookupError):
    """No session with that ID in the audit database."""


class UnknownCallError(LookupError):
    """No tool call with that ID in that session."""


class CallNotPendingError(Exception):
    """The tool call is not waiting for a decision (already decided, or it never needed one)."""


class SessionTakenOverError(AuditError):
    """Another orchestrator process resumed this session, so this one must stop writing to it.

    Every turn's write and the final status update only apply while the
    session's ``pid``/``host`` are still this process's: a session judged stale
    by mistake can be resumed without its old process duplicating a turn.
    """


def _add_missing_columns(database: peewee.Database) -> None:
    """Add nullable columns that newer models have to tables an older version created.

    ``create_tables(safe=True)`` leaves existing tables alone, so an audit file
    from before a column existed (e.g. ``messages.trace_id``) would fail every
    insert; old rows simply get NULL there.
    """
    for model in MODELS:
        meta: Any = model._meta
        existing = {column.name for column in database.get_columns(meta.table_name)}
        missing = [f for f in meta.sorted_fields if f.column_name not in existing and f.null]
        if missing:
            from playhouse.migrate import SchemaMigrator, migrate  # only an old file needs it

            migrator = SchemaMigrator.from_database(database)
            migrate(*(migrator.add_column(meta.table_name, f.column_name, f) for f in missing))


SCHEMA_LOCK_KEY = 0x4E15_7A0D
"""PostgreSQL advisory lock held while creating and migrating the schema (any constant; ours only)."""


def create_schema(database: peewee.Database) -> None:
    """Create missing tables and columns in one transaction, one process at a time, and only if any are missing.

    Why the check first: an audit database in use already has its schema, and
    the check only reads (in WAL mode readers never wait for a writer), so the
    many processes that start at once on one SQLite file do not each queue for
    the write lock just to find nothing to do; behind a writer that holds that
    lock for longer than the busy timeout, they would fail to open at all.

    Why the lock: several orchestrators starting at once against a new
    PostgreSQL database race in ``CREATE TABLE IF NOT EXISTS`` (the loser fails
    on a duplicate type name), and two of them adding the same new column fail
    the same way. An advisory lock held for the transaction serialises them, and
    DDL is transactional there. SQLite's ``BEGIN IMMEDIATE`` does the same, and
    whoever gets the lock second finds the work done (the check is repeated
    inside the transaction).
    """
    if schema_complete(database):
        return
    with database.atomic():
        if isinstance(database, peewee.PostgresqlDatabase):
            database.execute_sql("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))  # type: ignore[no-untyped-call]
        database.create_tables(MODELS, safe=True)
        _add_missing_columns(database)


def schema_complete(database: peewee.Database) -> bool:
    """Whether every table and every column of the models exists (read-only: takes no write lock)."""
    tables = set(database.get_tables())
    for model in MODELS:
        meta: Any = model._meta
        if meta.table_name not in tables:
            return False
        existing = {column.name for column in database.get_columns(meta.table_name)}
        if any(field.column_name not in existing for field in meta.sorted_fields):
            return False
    return True


def use_wal(database: peewee.Database) -> None:
    """Switch a SQLite file to WAL mode unless it is in it already (the mode is kept in the file).

    Why not a pragma on every connection: switching needs the file to itself,
    and SQLite answers a concurrent switch with "database is locked" at once,
    without waiting for the busy timeout; asking first (a read) means only the
    processes that open a brand-new file ever try, and the caller retries them.
    """
    if isinstance(database, peewee.SqliteDatabase) and str(database.pragma("journal_mode")).lower() != "wal":
        database.pragma("journal_mode", "wal")


def one_line(exc: BaseException) -> str:
    """Flatten a database error to one line (PostgreSQL adds DETAIL and HINT lines; users get one-line errors)."""
    return " ".join(str(exc).split())


def _plain_sqlite_database(url: str) -> str | None:
    """Return the database of a ``sqlite:///PATH`` URL with no host or query string (what the config writes), else None.

    Why not ``playhouse.db_url`` for these: importing it imports every engine
    it can register (pools, CockroachDB, the PostgreSQL and SQLite extensions),
    about a tenth of ``orchestrator sessions``; for this form it would only call
    ``peewee.SqliteDatabase(path)`` (``:memory:`` when the path is empty). Any
    other URL, a query string included, still goes through ``playhouse.db_url``.
    """
    parts = urlparse(url)  # as playhouse.db_url parses it
    if parts.scheme != "sqlite" or parts.netloc or parts.params or parts.query:
        return None
    return parts.path[1:] or ":memory:"


def _sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite"):
        return None
    database = _plain_sqlite_database(url)
    if database is None:
        from playhouse.db_url import parse  # type: ignore[import-untyped]

        database = parse(url).get("database")
    if not isinstance(database, str) or not database or database == ":memory:":
        return None
    return Path(database)


def _open_database(url: str) -> peewee.Database:
    """Connect from a ``playhouse.db_url`` URL; SQLite gets WAL, foreign keys and BEGIN IMMEDIATE.

    ``postgresql://`` URLs use psycopg2 (the libpq environment applies, e.g.
    ``PGPASSWORD``); no SQLite option may reach them.
    """
    options: dict[str, Any] = {}
    sqlite_file = _sqlite_path(url)
    if url.startswith("sqlite"):
        options = {
            # The busy timeout first (sqlite3.connect's ``timeout`` sets it too, before any statement); WAL
            # mode is ``use_wal``'s, once per file, not a pragma every connection would race for.
            "pragmas": (
                ("busy_timeout", BUSY_TIMEOUT_MS),
                ("foreign_keys", 1),
                ("synchronous", "normal"),
            ),
            "timeout": BUSY_TIMEOUT_MS / 1000,
            "lock_type": "IMMEDIATE",
        }
    if sqlite_file is not None:
        sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        _private_sqlite_file(sqlite_file)
    plain = _plain_sqlite_database(url)
    if plain is not None:
        return peewee.SqliteDatabase(plain, **options)
    from playhouse.db_url import connect

    database: peewee.Database = connect(url, **options)
    return database


def _private_sqlite_file(path: Path) -> None:
    """Make the audit file (every conversation) the owner's only, whoever opens it and with whatever umask.

    A new file is created empty with mode 0600 (SQLite takes an empty file as a
    new database) and an older one is tightened; SQLite gives its ``-wal`` and
    ``-shm`` files the database file's mode, and leftovers of an older version
    are tightened too.
    """
    if not path.exists():  # a reader of a read-only folder never tries to create anything
        with contextlib.suppress(FileExistsError):  # another process was quicker
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        make_private(file)


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
