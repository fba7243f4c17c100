"""The audit store on both engines: every test here runs against SQLite and a real PostgreSQL server."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from heist_common.audit import (
    AuditError,
    AuditStore,
    EventRow,
    MessageRow,
    SessionStatus,
    ToolUsageRow,
    TurnAudit,
    UnknownSessionError,
)
from heist_common.audit.schema import MODELS
from tests.support.audit_db import query
from tests.support.ports import free_port


@pytest.fixture
def store(audit_url: str) -> Iterator[AuditStore]:
    audit = AuditStore.open(audit_url)
    yield audit
    audit.close()


def engine(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgresql"


async def test_seed_queries_work_on_the_schema(store: AuditStore, audit_url: str) -> None:
    await store.create_session("heist_1", strategy="round_robin", seed=None, model="m")
    turn = TurnAudit(
        message=MessageRow(1, "safecracker", "Safecracker", "315 seconds"),
        tool_usage=[
            ToolUsageRow(1, "safecracker", "calculator", "Evaluate", '{"expression":"1"}', "1", True, "OK", 0.3)
        ],
        events=[EventRow("memory", "StoreMemory", "UNAVAILABLE", "down", 1.0, 1, "safecracker")],
    )
    await store.write_turn("heist_1", turn)
    await store.finish_session("heist_1", SessionStatus.COMPLETED)

    (message,) = query(
        audit_url, "SELECT turn_id, agent_name, agent_role, message, timestamp FROM messages WHERE session_id = ?",
        "heist_1",
    )  # fmt: skip
    assert message[:4] == (1, "safecracker", "Safecracker", "315 seconds") and message[4]
    tool = query(audit_url, "SELECT tool_name, tool_params, tool_result, success FROM tool_usage")
    assert tool == [("calculator", '{"expression":"1"}', "1", 1)]
    ((status, num_turns, end_time),) = query(audit_url, "SELECT status, num_turns, end_time FROM sessions")
    assert status == "completed" and num_turns == 1 and end_time
    event = query(audit_url, "SELECT service, operation, status_code, detail FROM events")
    assert event == [("memory", "StoreMemory", "UNAVAILABLE", "down")]
    if engine(audit_url) == "sqlite":
        assert query(audit_url, "PRAGMA journal_mode") == [("wal",)]


async def test_a_turn_is_one_transaction(store: AuditStore, audit_url: str) -> None:
    # The message insert fails (NOT NULL), so the tool call and the event written before it in the
    # same turn must be rolled back with it, and the session's turn count must not move.
    await store.create_session("heist_tx", strategy="round_robin", seed=None, model="m")
    broken = TurnAudit(
        message=MessageRow(1, "mole", "Inside Man", None),  # type: ignore[arg-type]
        tool_usage=[ToolUsageRow(1, "mole", "database_query", "Query", "{}", "1", True, "OK")],
        events=[EventRow("memory", "StoreMemory", "OK", "stored")],
    )
    with pytest.raises(AuditError, match=r"(?i)null"):
        await store.write_turn("heist_tx", broken)
    for table in ("messages", "tool_usage", "events"):
        assert query(audit_url, f"SELECT COUNT(*) FROM {table}") == [(0,)], table
    assert query(audit_url, "SELECT num_turns FROM sessions") == [(0,)]
    await store.write_turn("heist_tx", TurnAudit(message=MessageRow(1, "mole", "Inside Man", "fine")))
    assert query(audit_url, "SELECT num_turns FROM sessions") == [(1,)]


async def test_foreign_keys_enforced(store: AuditStore) -> None:
    with pytest.raises(AuditError, match=r"(?i)foreign key"):
        await store.write_turn("no_such_session", TurnAudit(message=MessageRow(1, "a", "b", "c")))


async def test_session_log_and_unknown_session(store: AuditStore) -> None:
    await store.create_session("heist_2", strategy="random", seed=5, model="m")
    await store.write_turn("heist_2", TurnAudit(message=MessageRow(1, "planner", "Mastermind", "go")))
    log = store.read_session_log("heist_2")
    assert log["session"]["seed"] == 5
    assert [m["message"] for m in log["messages"]] == ["go"]
    assert log["messages"][0]["session_id"] == "heist_2"
    assert await store.agent_messages("heist_2") == [("planner", 1, "go")]
    assert [row["session_id"] for row in store.read_sessions()] == ["heist_2"]
    with pytest.raises(UnknownSessionError):
        store.read_session_log("nope")


async def test_unwritable_database_raises_audit_error(store: AuditStore, audit_url: str) -> None:
    await store.create_session("heist_3", strategy="round_robin", seed=None, model="m")
    read_only = "PRAGMA query_only = 1" if engine(audit_url) == "sqlite" else "SET default_transaction_read_only = on"
    await store.run_in_writer(lambda: store.database.execute_sql(read_only))
    with pytest.raises(AuditError, match=r"(?i)read-?only") as caught:
        await store.write_turn("heist_3", TurnAudit(message=MessageRow(1, "a", "b", "c")))
    assert "\n" not in str(caught.value), "errors reach users as one line"


def test_unreachable_sqlite_database_is_an_audit_error(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(AuditError, match="cannot open audit database"):
        AuditStore.open(f"sqlite:///{blocker / 'sub' / 'heist.db'}")


def test_sqlite_url_with_a_query_string_opens_through_db_url_with_the_same_settings(tmp_path) -> None:
    """Only a bare ``sqlite:///PATH`` skips ``playhouse.db_url``; any other form still gets WAL and foreign keys."""
    url = f"sqlite:///{tmp_path / 'sub' / 'heist.db'}?timeout=1"
    store = AuditStore.open(url)
    try:
        assert store.location == str(tmp_path / "sub" / "heist.db")
        assert store.database.pragma("journal_mode") == "wal" and store.database.pragma("foreign_keys") == 1
    finally:
        store.close()
    assert (tmp_path / "sub" / "heist.db").is_file()


def test_unreachable_postgresql_server_is_an_audit_error_without_the_password() -> None:
    url = f"postgresql://heist:s3cret-pw@127.0.0.1:{free_port()}/heist"
    with pytest.raises(AuditError, match="cannot open audit database") as caught:
        AuditStore.open(url)
    message = str(caught.value)
    assert "s3cret-pw" not in message and "heist:***@127.0.0.1" in message and "\n" not in message


async def test_a_postgresql_restart_fails_one_write_and_the_session_still_ends_failed(postgres_cluster) -> None:
    # The writer's connection dies with the server; that write fails (the run stops there), and the
    # store reconnects so the final status still lands instead of leaving the session `active`.
    url = postgres_cluster.database()
    store = AuditStore.open(url)
    try:
        await store.create_session("heist_pg_restart", strategy="round_robin", seed=1, model="m")
        await store.write_turn("heist_pg_restart", TurnAudit(message=MessageRow(1, "a", "b", "before")))
        postgres_cluster.restart()
        with pytest.raises(AuditError, match="cannot write a turn: server closed the connection"):
            await store.write_turn("heist_pg_restart", TurnAudit(message=MessageRow(2, "a", "b", "lost")))
        await store.finish_session("heist_pg_restart", SessionStatus.FAILED, "cannot write a turn")
    finally:
        store.close()
    assert query(url, "SELECT status, num_turns FROM sessions") == [("failed", 1)]
    assert query(url, "SELECT message FROM messages") == [("before",)]


async def test_old_schema_is_migrated_in_place(audit_url: str) -> None:
    # A database written by an earlier version: no sessions.turns_planned/pid/host/heartbeat_at, no messages.trace_id.
    old_schema = [
        "CREATE TABLE sessions (session_id TEXT PRIMARY KEY, start_time TEXT NOT NULL, end_time TEXT,"
        " num_turns INTEGER NOT NULL, status TEXT NOT NULL, strategy TEXT, seed INTEGER, model TEXT, error TEXT)",
        "CREATE TABLE messages (id INTEGER PRIMARY KEY, session_id TEXT NOT NULL REFERENCES sessions (session_id),"
        " turn_id INTEGER NOT NULL, agent_name TEXT NOT NULL, agent_role TEXT NOT NULL, message TEXT NOT NULL,"
        " timestamp TEXT NOT NULL, status TEXT NOT NULL, latency_ms REAL)",
        "INSERT INTO sessions VALUES ('heist_old', '2026-01-01T00:00:00', NULL, 1, 'interrupted', 'random', 3, 'm',"
        " NULL)",
        "INSERT INTO messages (session_id, turn_id, agent_name, agent_role, message, timestamp, status, latency_ms)"
        " VALUES ('heist_old', 1, 'planner', 'Mastermind', 'old line', '2026-01-01', 'ok', 1.0)",
    ]
    if engine(audit_url) == "postgresql":
        old_schema[1] = old_schema[1].replace("id INTEGER PRIMARY KEY", "id SERIAL PRIMARY KEY")
    for statement in old_schema:
        query(audit_url, statement)

    store = AuditStore.open(audit_url)
    try:
        old = store.read_session_log("heist_old")
        assert old["session"]["status"] == "interrupted" and old["session"]["pid"] is None
        assert old["messages"][0]["message"] == "old line" and old["messages"][0]["trace_id"] is None
        await store.create_session("heist_new", strategy="round_robin", seed=None, model="m", turns_planned=4)
        await store.write_turn("heist_new", TurnAudit(message=MessageRow(1, "a", "b", "c", trace_id="t1")))
        new = store.read_session_log("heist_new")
        assert new["session"]["turns_planned"] == 4 and new["session"]["pid"] is not None
        assert new["messages"][0]["trace_id"] == "t1"
    finally:
        store.close()
    AuditStore.open(audit_url).close()  # opening a migrated database again changes nothing and does not fail


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from heist_common.audit import AuditStore, MessageRow, TurnAudit
    async def main(url, worker):
        store = AuditStore.open(url)
        sid = f"heist_w{worker}"
        await store.create_session(sid, strategy="round_robin", seed=None, model="m")
        for turn in range(1, 101):
            await store.write_turn(sid, TurnAudit(message=MessageRow(turn, "a", "b", "x" * 200)))
        store.close()
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


def test_four_processes_write_concurrently_without_locking_errors(audit_url: str) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, audit_url, str(n)], stderr=subprocess.PIPE) for n in range(4)
    ]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    assert query(audit_url, "SELECT COUNT(*) FROM messages") == [(400,)]
    assert query(audit_url, "SELECT SUM(num_turns) FROM sessions") == [(400,)]
    assert query(audit_url, "SELECT COUNT(DISTINCT session_id) FROM messages") == [(4,)]


OPENER = "import sys; from heist_common.audit import AuditStore; AuditStore.open(sys.argv[1]).close()"


def test_processes_creating_the_same_new_sqlite_database_at_once_all_open_it(tmp_path) -> None:
    # SQLite refuses a concurrent `PRAGMA journal_mode=wal` on a brand-new file with "database is locked"
    # without waiting; measured before the fix: about 1 start in 150 failed like this.
    for attempt in range(12):
        url = f"sqlite:///{tmp_path / f'new_{attempt}.db'}"
        procs = [subprocess.Popen([sys.executable, "-c", OPENER, url], stderr=subprocess.PIPE) for _ in range(4)]
        errors = [p.communicate(timeout=60)[1].decode() for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0, 0], errors


def test_an_audit_database_in_use_opens_while_another_process_holds_the_write_lock(tmp_path) -> None:
    # Opening a database that has its schema only reads; before, every open queued for the write lock
    # (BEGIN IMMEDIATE) and failed "database is locked" behind a writer that kept it past the busy timeout.
    path = tmp_path / "busy.db"
    url = f"sqlite:///{path}"
    AuditStore.open(url).close()
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute(
            "INSERT INTO sessions (session_id, start_time, num_turns, status) VALUES ('heist_busy', 'now', 0, 'active')"
        )
        opened = subprocess.run([sys.executable, "-c", OPENER, url], capture_output=True, text=True, timeout=60)
        assert opened.returncode == 0, opened.stderr
        writer.execute("COMMIT")
    finally:
        writer.close()
    assert query(url, "SELECT session_id FROM sessions") == [("heist_busy",)]
    assert query(url, "PRAGMA journal_mode") == [("wal",)]


def test_processes_creating_the_schema_in_one_new_postgresql_database_at_once_all_open_it(postgres_cluster) -> None:
    # Concurrent CREATE TABLE IF NOT EXISTS in one PostgreSQL database fails for all but one with
    # "duplicate key value violates unique constraint pg_type_typname_nsp_index" unless serialised.
    for _ in range(6):
        url = postgres_cluster.database()
        procs = [subprocess.Popen([sys.executable, "-c", OPENER, url], stderr=subprocess.PIPE) for _ in range(4)]
        errors = [p.communicate(timeout=60)[1].decode() for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
        tables = query(url, "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public'")
        assert tables == [(len(MODELS),)]
