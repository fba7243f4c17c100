"""Reading an audit database in tests, whatever its engine: one helper for SQLite files and PostgreSQL URLs."""

from __future__ import annotations

import sqlite3
from contextlib import closing

__all__ = ["query"]


def query(url: str, sql: str, *params: object) -> list[tuple[object, ...]]:
    """Run one statement against an audit database URL (SQLite or PostgreSQL); ``?`` placeholders on both."""
    if url.startswith("sqlite"):
        with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db, db:
            return list(db.execute(sql, params).fetchall())
    import psycopg2  # only for PostgreSQL URLs

    connection = psycopg2.connect(url)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute(sql.replace("%", "%%").replace("?", "%s"), params)
            return list(cursor.fetchall()) if cursor.description else []
    finally:
        connection.close()
