from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.audit import (
    AuditError,
    AuditStore,
    EventRow,
    MessageRow,
    SessionStatus,
    ToolUsageRow,
    TurnAudit,
    UnknownSessionError,
)


@pytest.fixture
def store(tmp_path: Path):
    audit = AuditStore.open(f"sqlite:///{tmp_path / 'audit' / 'heist.db'}")
    yield audit
    audit.close()


async def test_seed_queries_work_on_the_schema(store: AuditStore, tmp_path: Path) -> None:
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

    db = sqlite3.connect(tmp_path / "audit" / "heist.db")
    db.row_factory = sqlite3.Row
    message = db.execute("SELECT * FROM messages WHERE session_id = ?", ("heist_1",)).fetchone()
    assert (message["turn_id"], message["agent_name"], message["agent_role"], message["message"]) == (
        1,
        "safecracker",
        "Safecracker",
        "315 seconds",
    )
    assert message["timestamp"]
    tool = db.execute("SELECT tool_name, tool_params, tool_result, success FROM tool_usage").fetchone()
    assert tuple(tool) == ("calculator", '{"expression":"1"}', "1", 1)
    session = db.execute("SELECT status, num_turns, end_time FROM sessions").fetchone()
    assert session["status"] == "completed" and session["num_turns"] == 1 and session["end_time"]
    event = db.execute("SELECT service, operation, status_code, detail FROM events").fetchone()
    assert tuple(event) == ("memory", "StoreMemory", "UNAVAILABLE", "down")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


async def test_foreign_keys_enforced(store: AuditStore) -> None:
    with pytest.raises(AuditError, match="FOREIGN KEY"):
        await store.write_turn("no_such_session", TurnAudit(message=MessageRow(1, "a", "b", "c")))


async def test_session_log_and_unknown_session(store: AuditStore) -> None:
    await store.create_session("heist_2", strategy="random", seed=5, model="m")
    await store.write_turn("heist_2", TurnAudit(message=MessageRow(1, "planner", "Mastermind", "go")))
    log = store.read_session_log("heist_2")
    assert log["session"]["seed"] == 5
    assert [m["message"] for m in log["messages"]] == ["go"]
    assert log["messages"][0]["session_id"] == "heist_2"
    assert await store.agent_messages("heist_2") == [("planner", 1, "go")]
    with pytest.raises(UnknownSessionError):
        store.read_session_log("nope")


async def test_unwritable_database_raises_audit_error(store: AuditStore) -> None:
    await store.create_session("heist_3", strategy="round_robin", seed=None, model="m")
    await store.run_in_writer(lambda: store.database.execute_sql("PRAGMA query_only = 1"))
    with pytest.raises(AuditError, match="readonly"):
        await store.write_turn("heist_3", TurnAudit(message=MessageRow(1, "a", "b", "c")))


def test_unreachable_database_is_an_audit_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(AuditError, match="cannot open audit database"):
        AuditStore.open(f"sqlite:///{blocker / 'sub' / 'heist.db'}")


def test_four_processes_write_concurrently_without_locking_errors(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from orchestrator.audit import AuditStore, MessageRow, TurnAudit
        async def main(worker):
            store = AuditStore.open({url!r})
            sid = f"heist_w{{worker}}"
            await store.create_session(sid, strategy="round_robin", seed=None, model="m")
            for turn in range(1, 101):
                await store.write_turn(sid, TurnAudit(message=MessageRow(turn, "a", "b", "x" * 200)))
            store.close()
        asyncio.run(main(int(sys.argv[1])))
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(n)], stderr=subprocess.PIPE) for n in range(4)]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    db = sqlite3.connect(tmp_path / "shared.db")
    assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 400
    assert db.execute("SELECT SUM(num_turns) FROM sessions").fetchone()[0] == 400
    db.close()


def test_processes_creating_the_same_new_database_at_once_all_open_it(tmp_path: Path) -> None:
    # SQLite refuses a concurrent `PRAGMA journal_mode=wal` on a brand-new file with "database is locked"
    # without waiting; measured before the fix: about 1 start in 150 failed like this.
    script = "import sys; from orchestrator.audit import AuditStore; AuditStore.open(sys.argv[1]).close()"
    for attempt in range(12):
        url = f"sqlite:///{tmp_path / f'new_{attempt}.db'}"
        procs = [subprocess.Popen([sys.executable, "-c", script, url], stderr=subprocess.PIPE) for _ in range(4)]
        errors = [p.communicate(timeout=60)[1].decode() for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
