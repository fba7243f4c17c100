"""Resume: the stale rule, the compare-and-set takeover, the write fence, and whole resumed sessions (both engines)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from heist_common.audit import AuditStore, MessageRow, SessionStatus, SessionTakenOverError, TurnAudit
from heist_common.config import HeistConfig, load_config
from heist_common.exit_codes import ExitCode
from orchestrator.cli import main
from orchestrator.session.resume import NotResumableError, ResumeConflictError, judge_liveness, pid_alive, plan_resume
from orchestrator.session.runner import RunOptions, SessionResult, resume_session, run_session
from orchestrator.session.schedule import turn_schedule
from tests.support.audit_db import query
from tests.support.config import write_heist_config
from tests.support.inprocess import InProcessMesh
from tests.support.otlp import OTLPReceiver
from tests.support.processes import session_memories
from tests.support.scripted_llm import ScriptedLLM, text

NOW = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)
HOST = "this-host"
CREW = ("planner", "hacker", "safecracker", "mole")


def row(**fields: Any) -> dict[str, Any]:
    base = {
        "session_id": "heist_r",
        "status": "active",
        "pid": 4242,
        "host": HOST,
        "start_time": (NOW - timedelta(seconds=900)).isoformat(),
        "heartbeat_at": (NOW - timedelta(seconds=5)).isoformat(),
        "strategy": "random",
        "seed": 7,
        "turns_planned": 8,
        "error": None,
    }
    return {**base, **fields}


def judge(alive: bool, **fields: Any) -> tuple[bool, str]:
    verdict = judge_liveness(row(**fields), host=HOST, stale_after_s=600, now=NOW, alive=lambda pid: alive)
    return verdict.live, verdict.reason


# The stale rule -------------------------------------------------------------------------------------------


def test_a_dead_process_on_this_host_makes_the_session_stale_at_once() -> None:
    assert judge(False) == (False, f"its process 4242 on {HOST} is gone")


def test_a_live_process_with_a_recent_turn_is_running() -> None:
    live, reason = judge(True)
    assert live and "pid 4242 on this-host" in reason and "5 s ago" in reason


def test_no_turn_for_stale_after_s_makes_it_stale_even_with_a_live_pid() -> None:
    # A hung process (or a reused pid) cannot keep a session forever.
    live, reason = judge(True, heartbeat_at=(NOW - timedelta(seconds=601)).isoformat())
    assert not live and "no sign of life for 601 s" in reason


def test_another_hosts_session_is_judged_by_its_heartbeat_only() -> None:
    # Its pid means nothing here, so a "dead" pid must not make it stale.
    assert judge(False, host="other-host")[0] is True
    assert judge(False, host="other-host", heartbeat_at=(NOW - timedelta(hours=1)).isoformat())[0] is False


def test_a_session_without_owner_columns_falls_back_to_its_start_time() -> None:
    assert judge(True, pid=None, host=None, heartbeat_at=None)[0] is False  # started 900 s ago
    fresh = (NOW - timedelta(seconds=10)).isoformat()
    assert judge(True, pid=None, host=None, heartbeat_at=None, start_time=fresh)[0] is True


def test_pid_alive_sees_a_killed_child_as_dead_even_before_it_is_reaped() -> None:
    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert pid_alive(child.pid)
        child.kill()
        deadline = time.monotonic() + 5
        while Path(f"/proc/{child.pid}/stat").read_text().split(") ")[-1][0] != "Z":  # killed, not reaped yet
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not pid_alive(child.pid), "a zombie is a dead orchestrator"
    finally:
        child.kill()
        child.wait(timeout=5)
    assert not pid_alive(child.pid)


# Planning a resume ------------------------------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> HeistConfig:
    return load_config(write_heist_config(tmp_path, session={"strategy": "random", "max_turns": 8}))


def messages(agents: list[str]) -> list[tuple[int, str, str, str, str]]:
    return [(turn, agent, agent.title(), f"line {turn}", "ok") for turn, agent in enumerate(agents, start=1)]


def test_plan_continues_after_the_last_committed_turn(config: HeistConfig) -> None:
    done = turn_schedule("random", CREW, 8, 7)[:3]
    point = plan_resume(row(status="interrupted"), messages(done), config, host=HOST, now=NOW)
    assert (point.turns_done, point.turns_planned, point.seed, point.strategy) == (3, 8, 7, "random")
    assert [m.agent_name for m in point.history] == done and point.answered_before == 3
    assert point.describe() == "resumed after turn 3 of 8 (was interrupted)"


@pytest.mark.parametrize(
    ("fields", "agents", "message"),
    [
        ({"status": "completed"}, [], "is completed: nothing to resume"),
        ({"status": "degraded", "error": "memory: 0 of 16 calls succeeded (UNAVAILABLE)"}, [],
         "is degraded: it played every turn, but a service never worked (memory: 0 of 16"),
        ({}, [], "is still running (pid 4242 on this-host"),
        ({"status": "failed", "seed": None}, [], "without a recorded seed"),
        ({"status": "failed", "strategy": "manual"}, [], "strategy 'manual'"),
    ],
)
def test_plan_refuses_what_cannot_be_resumed(config: HeistConfig, fields, agents, message) -> None:
    with pytest.raises(NotResumableError, match=message.replace("(", r"\(")):
        plan_resume(row(**fields), messages(agents), config, host=HOST, now=NOW, alive=lambda pid: True)


def test_plan_refuses_gaps_in_the_turns(config: HeistConfig) -> None:
    gapped = [m for m in messages(turn_schedule("random", CREW, 8, 7)[:4]) if m[0] != 2]
    with pytest.raises(NotResumableError, match=r"turns \[1, 3, 4\]"):
        plan_resume(row(status="failed"), gapped, config, host=HOST, now=NOW)


def test_a_config_whose_schedule_differs_is_a_conflict(config: HeistConfig) -> None:
    other_seed = turn_schedule("random", CREW, 8, 8)
    assert other_seed[:4] != turn_schedule("random", CREW, 8, 7)[:4]
    with pytest.raises(ResumeConflictError, match="turn order differs"):
        plan_resume(row(status="interrupted"), messages(other_seed[:4]), config, host=HOST, now=NOW)


# Takeover and fence (both engines) -----------------------------------------------------------------------------


@pytest.fixture
def store(audit_url: str) -> Iterator[AuditStore]:
    audit = AuditStore.open(audit_url)
    yield audit
    audit.close()


async def test_a_session_records_its_owner_plan_and_heartbeat(store: AuditStore) -> None:
    await store.create_session("heist_o", strategy="random", seed=2**40, model="m", turns_planned=6)
    state, _ = await store.session_state("heist_o")
    assert (state["pid"], state["host"], state["turns_planned"], state["seed"]) == (
        os.getpid(), socket.gethostname(), 6, 2**40
    )  # fmt: skip
    started = state["heartbeat_at"]
    await store.write_turn("heist_o", TurnAudit(message=MessageRow(1, "planner", "Mastermind", "go")))
    state, rows = await store.session_state("heist_o")
    assert state["heartbeat_at"] > started and rows == [(1, "planner", "Mastermind", "go", "ok")]


async def test_a_claim_is_a_compare_and_set(store: AuditStore, audit_url: str) -> None:
    # Two resumes read the same row; the first claim changes it, so the second (same expectations) must lose.
    # (Each claim is one UPDATE ... WHERE <row unchanged>, atomic on both engines.)
    await store.create_session("heist_c", strategy="round_robin", seed=1, model="m", turns_planned=4)
    await store.finish_session("heist_c", SessionStatus.INTERRUPTED, "interrupted")
    seen, _ = await store.session_state("heist_c")
    assert await store.claim_session("heist_c", seen) is True
    assert await store.claim_session("heist_c", seen) is False
    assert query(audit_url, "SELECT status, end_time, error FROM sessions") == [("active", None, None)]


async def test_a_taken_over_session_fences_the_old_owners_writes(store: AuditStore, audit_url: str) -> None:
    await store.create_session("heist_f", strategy="round_robin", seed=1, model="m", turns_planned=4)
    await store.write_turn("heist_f", TurnAudit(message=MessageRow(1, "planner", "Mastermind", "mine")))
    # Another machine resumed it (as `claim_session` there would have written).
    query(audit_url, "UPDATE sessions SET pid = 99, host = 'elsewhere' WHERE session_id = 'heist_f'")

    with pytest.raises(SessionTakenOverError, match="resumed by pid 99 on elsewhere"):
        await store.write_turn("heist_f", TurnAudit(message=MessageRow(2, "hacker", "Hacker", "late")))
    with pytest.raises(SessionTakenOverError):
        await store.finish_session("heist_f", SessionStatus.FAILED, "too late")
    assert query(audit_url, "SELECT turn_id FROM messages") == [(1,)], "the fenced turn was rolled back whole"
    assert query(audit_url, "SELECT status, num_turns, error FROM sessions") == [("active", 1, None)]


# Whole sessions (in-process servers, scripted LLM, both engines) -------------------------------------------------


def random_config(mesh: InProcessMesh, audit_url: str, turns: int) -> HeistConfig:
    session = mesh.config.session.model_copy(update={"strategy": "random", "max_turns": turns})
    return mesh.config.with_overrides(
        session=session, database=mesh.config.database.model_copy(update={"url": audit_url})
    )


async def interrupted_after(config: HeistConfig, turns: int, session_id: str) -> None:
    """Run a session and cancel it (Ctrl-C) as soon as turn ``turns`` is committed."""
    task: asyncio.Task[SessionResult] | None = None

    def on_turn(turn: Any) -> None:
        if turn.turn_id == turns and task is not None:
            task.cancel()

    task = asyncio.ensure_future(run_session(config, RunOptions(session_id=session_id), on_turn=on_turn))
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_interrupted_random_session_resumes_where_it_stopped(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM, audit_url: str
) -> None:
    scripted_llm.responder = lambda body: text(f"line {len(scripted_llm.chat_requests)}")
    config = random_config(mesh, audit_url, 8)
    sid = "heist_resume_inproc"
    await interrupted_after(config, 3, sid)
    assert query(audit_url, "SELECT status, num_turns FROM sessions") == [("interrupted", 3)]
    (seed,) = query(audit_url, "SELECT seed FROM sessions")[0]

    resumed: list[str] = []
    result = await resume_session(config, sid, on_resume=lambda point: resumed.append(point.describe()))

    assert resumed == ["resumed after turn 3 of 8 (was interrupted; its error: interrupted)"]
    assert result.status == "completed" and result.exit_code == 0 and result.session_id == sid
    assert result.turns_before == 3 and [t.turn_id for t in result.turns] == [4, 5, 6, 7, 8]
    rows = query(audit_url, "SELECT turn_id, agent_name FROM messages ORDER BY turn_id")
    assert rows == list(enumerate(turn_schedule("random", CREW, 8, int(seed)), start=1))
    assert query(audit_url, "SELECT status, num_turns, error FROM sessions") == [("completed", 8, None)]
    # The conversation before the interruption is in the first resumed turn's prompt (the Ctrl-C may have
    # cut turn 4's request short, so count from the end: the resumed run made the last five).
    prompt = str(scripted_llm.chat_requests[-5]["messages"])
    assert "line 3" in prompt and "line 2" in prompt
    events = query(audit_url, "SELECT operation, detail FROM events WHERE service IN ('orchestrator', 'memory')")
    assert ("resume", resumed[0]) in events
    assert ("rebuild", "re-stored 3 messages from the audit database") in events
    assert await asyncio.to_thread(session_memories, mesh.config, sid) == 8

    with pytest.raises(NotResumableError, match="is completed"):
        await resume_session(config, sid)


async def test_a_resumed_session_keeps_the_objective_it_was_started_with(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM, audit_url: str
) -> None:
    scripted_llm.responder = lambda body: text(f"line {len(scripted_llm.chat_requests)}")
    config = random_config(mesh, audit_url, 6)
    own = "Lift the clock collection from the city museum."
    assert config.session.objective != own
    started = config.with_overrides(session=config.session.model_copy(update={"objective": own}))
    sid = "heist_resume_objective"
    await interrupted_after(started, 2, sid)
    assert query(audit_url, "SELECT objective FROM sessions") == [(own,)]

    result = await resume_session(config, sid)  # today's config has another objective

    assert result.status == "completed" and [t.turn_id for t in result.turns] == [3, 4, 5, 6]
    resumed_prompts = [str(request["messages"]) for request in scripted_llm.chat_requests[-4:]]
    assert all(own in prompt and config.session.objective not in prompt for prompt in resumed_prompts)


async def test_resume_rebuilds_a_memory_service_that_lost_everything(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM, audit_url: str
) -> None:
    config = random_config(mesh, audit_url, 6)
    sid = "heist_resume_memory"
    await interrupted_after(config, 2, sid)
    await mesh.restart("memory")  # empty now
    assert await asyncio.to_thread(session_memories, mesh.config, sid) == 0
    result = await resume_session(config, sid)
    assert result.status == "completed"
    assert await asyncio.to_thread(session_memories, mesh.config, sid) == 6


async def test_a_resumed_session_exports_its_turns_spans_like_a_new_one(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM, audit_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = random_config(mesh, audit_url, 5)
    sid = "heist_resume_traced"
    await interrupted_after(config, 2, sid)
    with OTLPReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        result = await resume_session(config, sid)  # returns once its spans are flushed
        traces = receiver.traces()
    assert result.status == "completed" and [t.turn_id for t in result.turns] == [3, 4, 5]
    resumed = query(audit_url, "SELECT turn_id, agent_name, trace_id FROM messages WHERE turn_id > 2 ORDER BY turn_id")
    assert {trace for _, _, trace in resumed} <= set(traces)
    for turn_id, agent, trace_id in resumed:
        roots = [(span.service, span.name) for span in traces[trace_id] if span.is_root]
        assert roots == [("heist-orchestrator", f"turn {turn_id} {agent}")]
        assert any(span.attributes.get("gen_ai.operation.name") for span in traces[trace_id])


# The CLI ---------------------------------------------------------------------------------------------------------


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def test_cli_resume_exit_codes(config_path: Path, audit_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = AuditStore.open(audit_url)
    try:
        await store.create_session("heist_done", strategy="round_robin", seed=1, model="m", turns_planned=4)
        await store.finish_session("heist_done", SessionStatus.COMPLETED)
        await store.create_session("heist_live", strategy="round_robin", seed=1, model="m", turns_planned=4)
    finally:
        store.close()
    base = ("--config", str(config_path), "--db", audit_url)

    assert await cli("resume", "heist_nope", *base) == ExitCode.UNKNOWN_SESSION == 5
    assert capsys.readouterr().err == "orchestrator: unknown session 'heist_nope' (see 'orchestrator sessions')\n"
    assert await cli("resume", "heist_done", *base) == ExitCode.NOT_RESUMABLE == 7
    assert (
        capsys.readouterr().err == "orchestrator: cannot resume: session heist_done is completed: nothing to resume\n"
    )
    # This test's own process owns heist_live and has just written it: it is running.
    assert await cli("resume", "heist_live", *base) == ExitCode.NOT_RESUMABLE
    err = capsys.readouterr().err
    assert (
        err.startswith("orchestrator: cannot resume: session heist_live is still running (pid ")
        and err.count("\n") == 1
    )
    assert query(audit_url, "SELECT session_id, status FROM sessions ORDER BY session_id") == [
        ("heist_done", "completed"), ("heist_live", "active")
    ], "a refused resume changes nothing"  # fmt: skip


def test_cli_resume_help_documents_the_rule_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["resume", "--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    assert "session.stale_after_s" in shown and "7 not resumable" in shown and "5 unknown session" in shown
