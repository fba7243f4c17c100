"""One W3C trace per turn: every RPC of a turn carries it, the message row records it, servers log it."""

from __future__ import annotations

import re
import sqlite3

from heist_common.audit import AuditStore, EventRow
from orchestrator.session.runner import RunOptions, run_session
from orchestrator.tracing import current_trace_id, turn_scope
from tests.support.access_log import access_entries
from tests.support.inprocess import InProcessMesh, audit_rows
from tests.support.scripted_llm import ScriptedLLM, inline_tool, text

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-00$")
"""With tracing off: W3C shape, flags "not sampled" (nothing records the turn, so no collector should expect it)."""


def test_with_tracing_off_a_turn_has_one_w3c_traceparent_and_a_fresh_trace() -> None:
    assert current_trace_id() is None
    with turn_scope(None, "heist_t", "planner", 1) as scope:
        header = dict(scope.outgoing(None))["traceparent"]
        match = TRACEPARENT.match(header)
        assert match and match[1] == scope.trace_id == current_trace_id()
        assert scope.client_span("x", {}) is None, "no span is created with tracing off"
        with turn_scope(None, "heist_t", "planner", 1) as same:
            assert same is scope  # the runner opens the turn, take_turn re-enters it
        with turn_scope(None, "heist_t", "hacker", 2) as other:
            assert other.trace_id != scope.trace_id
        assert current_trace_id() == scope.trace_id
    assert current_trace_id() is None


async def test_each_turn_is_one_trace_across_services(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script(
        text("Plan: Friday night."),
        inline_tool("file_reader", "bank_layout.md"),
        inline_tool("calculator", "6*7"),
        inline_tool("database_query", "SELECT name FROM guards LIMIT 1"),
    )
    result = await run_session(mesh.config, RunOptions(turns=4))
    await mesh.stop_all()  # flushes the servers' access logs

    rows = audit_rows(
        mesh.config,
        "SELECT agent_name, trace_id FROM messages WHERE session_id = ? ORDER BY turn_id",
        result.session_id,
    )
    traces = {agent: trace for agent, trace in rows}
    assert all(re.fullmatch(r"[0-9a-f]{32}", trace) for trace in traces.values())
    assert len(set(traces.values())) == 4  # a new trace per turn
    assert [t.trace_id for t in result.turns] == [trace for _, trace in rows]

    log = access_entries(mesh.log.getvalue())

    def services_in(trace: str) -> set[str]:
        return {entry["service"] for entry in log if entry["trace"] == trace}

    # The safecracker's turn: token from OAuth, its tool, its StoreMemory, all under one trace.
    assert {"oauth", "calculator", "memory"} <= services_in(traces["safecracker"])
    assert "calculator" not in services_in(traces["hacker"])
    assert all(entry["session"] == result.session_id for entry in log if entry["trace"] == traces["mole"])


async def test_an_audit_file_from_before_trace_ids_is_upgraded_in_place(tmp_path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE sessions (session_id TEXT PRIMARY KEY, start_time TEXT NOT NULL, end_time TEXT,
            num_turns INTEGER NOT NULL, status TEXT NOT NULL, strategy TEXT, seed INTEGER, model TEXT, error TEXT);
        CREATE TABLE messages (id INTEGER PRIMARY KEY, session_id TEXT NOT NULL, turn_id INTEGER NOT NULL,
            agent_name TEXT NOT NULL, agent_role TEXT NOT NULL, message TEXT NOT NULL, timestamp TEXT NOT NULL,
            status TEXT NOT NULL, latency_ms REAL);
        INSERT INTO sessions VALUES ('heist_old', '2026-01-01', NULL, 1, 'completed', NULL, NULL, NULL, NULL);
        INSERT INTO messages VALUES (1, 'heist_old', 1, 'planner', 'Mastermind', 'hello', '2026-01-01', 'ok', 1.0);
        """
    )
    old.close()

    store = AuditStore.open(f"sqlite:///{path}")
    try:
        await store.add_events("heist_old", [EventRow("llm", "health_check", "SERVING", "")])
    finally:
        store.close()
    upgraded = sqlite3.connect(path)
    columns = [row[1] for row in upgraded.execute("PRAGMA table_info(messages)")]
    assert columns[9:11] == ["trace_id", "timings"]
    assert {"prompt_tokens", "completion_tokens", "tokens_estimated"} <= set(columns[11:])  # and other later ones
    assert upgraded.execute("SELECT message, trace_id, timings, prompt_tokens FROM messages").fetchall() == [
        ("hello", None, None, None)
    ]
