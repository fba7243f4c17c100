"""Every failure path of a turn: the session survives and the audit says what happened."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from heist.memory.v1 import memory_pb2, memory_pb2_grpc

from heist_common.config import load_config
from orchestrator.session.runner import RunOptions, SessionRunner, run_session
from tests.support import channels
from tests.support.config import write_heist_config
from tests.support.inprocess import InProcessMesh, SessionHarness, audit_rows
from tests.support.scripted_llm import ScriptedLLM, hang, http_error, inline_tool, text, tool_call
from tests.support.tokens import session_metadata

REPO = Path(__file__).resolve().parents[2]


async def test_oauth_down_agent_speaks_without_tools(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    await mesh.stop("oauth")
    session = await SessionHarness(mesh.config).begin()
    try:
        scripted_llm.script(inline_tool("file_reader", "bank_layout.md"))
        turn = await session.turn("hacker")
    finally:
        await session.close()
    assert "[TOOL:" not in scripted_llm.chat_requests[0]["messages"][0]["content"]
    assert turn.tool_usage[0].status_code == "NO_TOKEN" and not turn.tool_usage[0].success
    events = session.rows("SELECT service, operation, status_code FROM events ORDER BY id")
    assert ("oauth", "IssueToken", "UNAVAILABLE") in events
    assert ("orchestrator", "tools_disabled", "UNAVAILABLE") in events
    assert session.rows("SELECT message FROM messages") == [(turn.message,)]


async def test_tool_down_is_audited_and_turn_completes(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    await mesh.stop("calculator")
    session = await SessionHarness(mesh.config).begin()
    try:
        scripted_llm.script(inline_tool("calculator", "1+1"))
        turn = await session.turn("safecracker")
    finally:
        await session.close()
    assert "error: UNAVAILABLE" in turn.message
    row = session.rows("SELECT tool_name, success, status_code, latency_ms FROM tool_usage")[0]
    assert row[:3] == ("calculator", 0, "UNAVAILABLE") and row[3] >= 0
    assert session.rows("SELECT service, operation, status_code FROM events WHERE service = 'calculator'") == [
        ("calculator", "Evaluate", "UNAVAILABLE")
    ]


async def test_tool_not_allowed_is_refused_and_never_called(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    session = await SessionHarness(mesh.config).begin()
    try:
        scripted_llm.script(inline_tool("calculator", "1+1"))
        planner = await session.turn("planner")  # planner has no tools
        scripted_llm.script(tool_call("database_query_query", sql="SELECT 1"), text("fine"))
        session.context.config = session.config.with_overrides(
            llm=session.config.llm.model_copy(update=dict(tool_calling="native"))
        )
        native = await session.turn("hacker")
    finally:
        await session.close()
    assert planner.tool_usage[0].status_code == "NOT_ALLOWED"
    assert "not allowed" in planner.message
    assert native.tool_usage[0].status_code == "NOT_ALLOWED" and native.message == "fine"
    await mesh.stop_all()  # flushes the servers' access logs, so the absence below means no call was made
    assert "Evaluate" not in mesh.log.getvalue() and "/Query" not in mesh.log.getvalue()
    assert session.rows("SELECT COUNT(*) FROM events WHERE status_code = 'NOT_ALLOWED'") == [(2,)]


async def test_llm_500_and_timeout_store_error_as_message(tmp_path: Path, scripted_llm: ScriptedLLM) -> None:
    path = write_heist_config(tmp_path, llm={"base_url": scripted_llm.base_url, "timeout_s": 0.3, "max_retries": 0})
    harness = InProcessMesh(load_config(path))
    await harness.start_all()
    try:
        scripted_llm.script(http_error(500, "model crashed"), hang(3), text("back"))
        result = await run_session(harness.config, RunOptions(turns=3))
    finally:
        await harness.stop_all()
    assert result.status == "completed"
    messages = [t.message for t in result.turns]
    assert messages[0] == "Error generating response: HTTP 500: model crashed"
    assert messages[1].startswith("Error generating response: TIMEOUT")
    assert messages[2] == "back"
    assert audit_rows(harness.config, "SELECT status FROM messages ORDER BY turn_id") == [
        ("llm_error",),
        ("llm_error",),
        ("ok",),
    ]
    assert audit_rows(
        harness.config, "SELECT status_code FROM events WHERE service = 'llm' AND turn_id IS NOT NULL"
    ) == [("HTTP 500",), ("TIMEOUT",)]


async def test_circuit_opens_skips_calls_then_recovers(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    session = await SessionHarness(mesh.config).begin()  # threshold 2, reset 0.5 s
    try:
        await mesh.stop("calculator")
        scripted_llm.script(*[inline_tool("calculator", "2*2") for _ in range(4)])
        first, second = await session.turn("safecracker"), await session.turn("safecracker")
        assert [first.tool_usage[0].status_code, second.tool_usage[0].status_code] == ["UNAVAILABLE", "UNAVAILABLE"]
        assert session.clients.services["calculator"].circuit_state == "open"
        skipped = await session.turn("safecracker")
        assert skipped.tool_usage[0].status_code == "CIRCUIT_OPEN"
        assert skipped.tool_usage[0].tool_result == "circuit open"
        await mesh.start("calculator")
        await asyncio.sleep(0.6)
        trial = await session.turn("safecracker")
        assert trial.tool_usage[0].success and "2*2 = 4" in trial.message
        assert session.clients.services["calculator"].circuit_state == "closed"
    finally:
        await session.close()
    rows = session.rows("SELECT success, tool_result FROM tool_usage WHERE status_code = 'CIRCUIT_OPEN'")
    assert rows == [(0, "circuit open")]
    assert session.rows("SELECT COUNT(*) FROM events WHERE status_code = 'CIRCUIT_OPEN'") == [(1,)]


async def _session_memories(mesh: InProcessMesh, session_id: str) -> int:
    async with channels.aio_channel(mesh.config, "memory") as channel:
        stats = await memory_pb2_grpc.MemoryServiceStub(channel).GetStats(
            memory_pb2.GetStatsRequest(), metadata=session_metadata(mesh.config, session_id)
        )
    return stats.session_memories


async def test_memory_down_then_rebuilt_from_audit(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    session = await SessionHarness(mesh.config).begin()
    try:
        await session.turn("planner")
        await mesh.stop("memory")
        hacker = await session.turn("hacker")
        assert {e.operation for e in hacker.events if e.service == "memory"} >= {"GetCompressedMemory", "StoreMemory"}
        await mesh.start("memory")  # comes back empty
        await asyncio.sleep(0.6)  # the breaker may be open after two failures; let it half-open
        await session.turn("safecracker")
        assert await _session_memories(mesh, session.session_id) == 3
        assert session.rows("SELECT status_code FROM events WHERE operation = 'rebuild'") == [("OK",)]
    finally:
        await session.close()


async def test_silent_memory_restart_is_detected_and_rebuilt(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    session = await SessionHarness(mesh.config).begin()
    try:
        await session.turn("planner")
        await session.turn("hacker")
        await mesh.restart("memory")  # no failed call in between: only the counts tell
        await session.turn("planner")
        assert await _session_memories(mesh, session.session_id) == 3
        assert session.context.memory_sync.rebuilds == 1
    finally:
        await session.close()


async def test_require_healthy_exits_6_before_any_turn(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    await mesh.stop("file_reader")
    result = await run_session(mesh.config, RunOptions(require_healthy=True))
    assert result.exit_code == 6 and result.status == "failed" and result.turns == []
    assert scripted_llm.chat_requests == []
    assert "file_reader" in (result.error or "")
    assert ("file_reader", "UNREACHABLE") in audit_rows(
        mesh.config, "SELECT service, status_code FROM events WHERE operation = 'health_check'"
    )


async def test_degraded_start_continues(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    await mesh.stop("database_query")
    result = await run_session(mesh.config, RunOptions(turns=2))
    assert result.status == "completed" and result.degraded_services == ["database_query"]


async def test_unwritable_database_stops_run_cleanly(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    session = SessionHarness(mesh.config)
    make_read_only = []

    def after_turn(_turn: object) -> None:
        make_read_only.append(
            asyncio.ensure_future(
                session.audit.run_in_writer(lambda: session.audit.database.execute_sql("PRAGMA query_only = 1"))
            )
        )

    try:
        runner = SessionRunner(
            mesh.config, session.clients, session.llm, session.audit, RunOptions(turns=4), on_turn=after_turn
        )
        result = await runner.run()
    finally:
        await session.close()
    assert result.status == "failed" and result.exit_code == 1
    assert "readonly" in (result.error or "")
    assert len(result.turns) == 1


async def test_cancellation_marks_session_interrupted(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script(text("one"), hang(10))
    task = asyncio.ensure_future(run_session(mesh.config, RunOptions(session_id="heist_cancel_me")))
    while len(scripted_llm.chat_requests) < 2:
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert audit_rows(mesh.config, "SELECT status, num_turns FROM sessions") == [("interrupted", 1)]


@pytest.mark.parametrize("redis_first", [False, True], ids=["orchestrator alone", "redis already imported"])
def test_circuits_do_not_load_redis_unless_the_process_already_has_it(redis_first: bool) -> None:
    """pybreaker would import redis for a storage we do not use; a process that uses redis keeps pybreaker's support."""
    code = (
        "import sys\n"
        f"if {redis_first}: import redis\n"
        "from orchestrator.mesh.clients import _import_pybreaker\n"
        "_import_pybreaker()\n"
        "import pybreaker\n"
        "breaker = pybreaker.CircuitBreaker(fail_max=1)\n"
        "print(pybreaker.HAS_REDIS_SUPPORT, 'redis' in sys.modules)\n"
        "import redis\n"  # still importable afterwards
        "print(redis.Redis.__name__)\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == [str(redis_first), str(redis_first), "Redis"]
