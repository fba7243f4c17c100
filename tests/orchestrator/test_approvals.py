"""Tool calls that wait for a person (approve, deny, timeout, kill -9 while waiting) and calls that never run twice.

The servers run in the test's process (their access logs in ``mesh.log``); a
session that must die by ``kill -9`` runs as an ``orchestrator run``
subprocess, the scripted LLM holding its turn at the right moment.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from heist_common.audit import AuditStore
from heist_common.audit.approvals import decide, os_user, pending_calls
from heist_common.config import HeistConfig, load_config
from heist_common.exit_codes import ExitCode
from orchestrator.session.runner import RunOptions, SessionResult, resume_session, run_session
from tests.support.access_log import calls
from tests.support.config import CREW, write_heist_config
from tests.support.inprocess import InProcessMesh, audit_rows
from tests.support.scripted_llm import Reply, ScriptedLLM, hang, inline_tool, text, tool_call

REPO = Path(__file__).resolve().parents[2]
QUERY = "SELECT name FROM guards LIMIT 1"
WAIT_S = 30.0


def guarded_crew() -> list[dict[str, Any]]:
    """The tests' crew with the mole's database queries needing approval (as the shipped config has it)."""
    return [
        {**agent, "require_approval": ["database_query"]} if agent["name"] == "mole" else agent for agent in CREW
    ]


def last_text(body: dict[str, Any]) -> str:
    return str(body["messages"][-1].get("content") or "")


def turn_of(body: dict[str, Any]) -> str:
    """Whose turn a chat request is for ('' for the health probe)."""
    cue = last_text(body)
    return cue.split("Your turn, ", 1)[1].split(" ", 1)[0] if "Your turn, " in cue else ""


@pytest.fixture
def guarded(tmp_path: Path, scripted_llm: ScriptedLLM) -> Path:
    return write_heist_config(
        tmp_path,
        "guarded.yaml",
        llm_base_url=scripted_llm.base_url,
        agents=guarded_crew(),
        llm={"base_url": scripted_llm.base_url, "timeout_s": 30, "max_retries": 0, "tool_calling": "native"},
        session={"max_turns": 4, "approval_timeout_s": 300},
    )


@pytest.fixture
async def guarded_mesh(guarded: Path) -> Any:
    harness = InProcessMesh(load_config(guarded))
    await harness.start_all()
    try:
        yield harness
    finally:
        await harness.stop_all()


def mole_queries(body: dict[str, Any]) -> Reply:
    """The mole calls database_query once, then answers its result; everyone else just talks."""
    if body["messages"][-1]["role"] == "tool":
        return text("Noted.")
    if turn_of(body) == "mole" and body.get("tools"):  # offered functions: not in a resumed turn that settled its calls
        return tool_call("database_query_query", sql=QUERY)
    return text("Fine.")


async def cli(*argv: str) -> tuple[int, str, str]:
    """The CLI in a process of its own: this one holds the running session's audit store (one per process)."""
    command = [str(Path(sys.executable).parent / "orchestrator"), *argv]
    done = await asyncio.to_thread(subprocess.run, command, cwd=REPO, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout, done.stderr


async def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def pending(config: HeistConfig, session_id: str) -> list[tuple[Any, ...]]:
    try:
        return audit_rows(config, "SELECT call_id FROM tool_calls WHERE session_id = ? AND status = 'pending_approval'",
                          session_id)  # fmt: skip
    except sqlite3.OperationalError:  # the session has not created its database yet
        return []


def status(config: HeistConfig, session_id: str) -> str:
    return str(audit_rows(config, "SELECT status FROM sessions WHERE session_id = ?", session_id)[0][0])


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_approve_and_deny_through_the_cli(
    guarded_mesh: InProcessMesh, guarded: Path, scripted_llm: ScriptedLLM
) -> None:
    config = guarded_mesh.config
    live = guarded_mesh.write_config(guarded, guarded.parent / "live.yaml")
    base = ("--config", str(live))
    scripted_llm.responder = mole_queries
    approved_before = sample("heist_tool_approvals_decided_total", tool="database_query", decision="approved")
    denied_before = sample("heist_tool_approvals_decided_total", tool="database_query", decision="denied")
    outcomes: dict[str, SessionResult] = {}
    for sid, verdict in (("heist_approve", "approve"), ("heist_deny", "deny")):
        session = asyncio.ensure_future(run_session(config, RunOptions(session_id=sid)))
        await wait_for(lambda sid=sid: pending(config, sid) and status(config, sid) == "awaiting_approval",  # type: ignore[misc]
                       f"{sid}'s call to wait")  # fmt: skip

        code, out, _ = await cli("approvals", sid, "--json", *base)
        assert code == 0
        [listed] = json.loads(out)
        assert listed["call_id"] == "4.1" and listed["agent"] == "mole" and listed["tool"] == "database_query"
        assert json.loads(listed["arguments"]) == {"sql": QUERY} and listed["waiting_since"]
        code, out, _ = await cli("approvals", *base)
        assert code == 0 and sid in out and "4.1" in out

        extra = ("--reason", "too risky") if verdict == "deny" else ()
        code, said, _ = await cli(verdict, sid, "4.1", *extra, *base)
        assert code == 0
        assert said.startswith(f"{'approved' if verdict == 'approve' else 'denied'}: call 4.1 of {sid}")
        # Deciding twice is refused, and says who decided first.
        code, _, err = await cli("approve", sid, "4.1", *base)
        assert code == ExitCode.NOT_PENDING and "not pending" in err and err.count("\n") == 1
        outcomes[sid] = await asyncio.wait_for(session, WAIT_S)

    assert outcomes["heist_approve"].status == "completed", outcomes["heist_approve"].error
    assert outcomes["heist_deny"].status == "completed"
    rows = audit_rows(config, "SELECT session_id, status_code, success, tool_result, call_id FROM tool_usage "
                      "WHERE tool_name = 'database_query' ORDER BY session_id")  # fmt: skip
    assert rows[0][:2] == ("heist_approve", "OK") and rows[0][4] == "4.1"
    assert rows[1][:3] == ("heist_deny", "DENIED", 0) and rows[1][3].endswith(": too risky")
    decided = audit_rows(config, "SELECT session_id, status, decided_by, decided_at FROM tool_calls ORDER BY 1")
    assert [(s, st) for s, st, *_ in decided] == [("heist_approve", "done"), ("heist_deny", "denied")]
    assert all(by and at for *_, by, at in decided)
    # The model's next request (the answer to the tool result) is told the call was denied, and why.
    told = [body for body in scripted_llm.chat_requests if body["messages"][-1]["role"] == "tool"]
    assert "denied by" in last_text(told[-1]) and "too risky" in last_text(told[-1])
    decided_total = "heist_tool_approvals_decided_total"
    assert sample(decided_total, tool="database_query", decision="approved") == approved_before + 1
    assert sample(decided_total, tool="database_query", decision="denied") == denied_before + 1
    assert sample("heist_tool_approvals_pending", tool="database_query") == 0
    assert (await cli("approve", "heist_nope", "4.1", *base))[0] == ExitCode.UNKNOWN_SESSION
    code, _, err = await cli("deny", "heist_approve", "9.9", "--reason", "x", *base)
    assert code == ExitCode.NOT_PENDING and "no tool call '9.9'" in err


async def test_nobody_deciding_denies_by_timeout(
    guarded_mesh: InProcessMesh, scripted_llm: ScriptedLLM
) -> None:
    session = guarded_mesh.config.session.model_copy(update={"approval_timeout_s": 0.5})
    config = guarded_mesh.config.with_overrides(session=session)
    scripted_llm.responder = mole_queries
    before = sample("heist_tool_approval_wait_seconds_count", tool="database_query", decision="timeout")
    result = await run_session(config, RunOptions(session_id="heist_timeout"))
    assert result.status == "completed"
    [(code, reason)] = audit_rows(config, "SELECT status_code, tool_result FROM tool_usage WHERE session_id = ?",
                                  "heist_timeout")  # fmt: skip
    assert code == "DENIED" and "session.approval_timeout_s" in reason and reason.startswith("denied by timeout")
    assert sample("heist_tool_approval_wait_seconds_count", tool="database_query", decision="timeout") == before + 1
    calls_made = calls(guarded_mesh.log.getvalue(), "Query")
    assert calls_made == [], "a denied call is never sent"


async def test_the_public_decide_api_wakes_the_waiting_session(
    guarded_mesh: InProcessMesh, guarded: Path, scripted_llm: ScriptedLLM
) -> None:
    """What the A2A service calls: pending_calls to show the pause, decide to end it (here from another process)."""
    config = guarded_mesh.config
    live = guarded_mesh.write_config(guarded, guarded.parent / "live.yaml")
    scripted_llm.responder = mole_queries
    proc = start_run(live, "heist_api")
    try:
        await wait_for(lambda: pending(config, "heist_api"), "the call to wait")
        store = AuditStore.open(config.database.url)
        try:
            [call] = await pending_calls(store, "heist_api")
            assert (call.agent_name, call.tool_name, call.operation) == ("mole", "database_query", "Query")
            decision = await decide(store, "heist_api", call.call_id, "approve", decided_by="a2a:alice")
        finally:
            store.close()
        out, err = await asyncio.to_thread(proc.communicate, timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            kill_9(proc)
    assert decision.status == "approved" and decision.decided_by == "a2a:alice"
    assert proc.returncode == 0, err
    assert "Session:    heist_api (completed)" in out


def start_run(live: Path, session_id: str) -> subprocess.Popen[str]:
    command = [str(Path(sys.executable).parent / "orchestrator"), "run", "--config", str(live),
               "--session-id", session_id, "--no-prompt"]  # fmt: skip
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip


def kill_9(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=WAIT_S)
    return out


@pytest.mark.parametrize("decide_before_resume", [True, False], ids=["decided-while-dead", "decided-after-resume"])
async def test_kill_9_while_a_call_waits_then_resume_runs_it_once(
    guarded_mesh: InProcessMesh,
    guarded: Path,
    scripted_llm: ScriptedLLM,
    decide_before_resume: bool,
) -> None:
    config = guarded_mesh.config
    live = guarded_mesh.write_config(guarded, guarded.parent / "live.yaml")
    sid = "heist_killed_waiting"
    scripted_llm.responder = mole_queries
    proc = start_run(live, sid)
    command = f"approve: orchestrator --config {live} approve {sid} 4.1"
    printed = ""
    try:  # the run prints the command that decides the call once the call waits
        deadline = time.monotonic() + WAIT_S
        while command not in printed:
            assert time.monotonic() < deadline and proc.poll() is None, printed
            assert proc.stdout is not None
            printed += await asyncio.to_thread(proc.stdout.readline)
    finally:
        kill_9(proc)
    assert pending(config, sid) == [("4.1",)]
    assert audit_rows(config, "SELECT status FROM sessions") == [("awaiting_approval",)]

    if decide_before_resume:  # nobody runs the session: the decision waits in the audit
        assert (await cli("approve", sid, "4.1", "--config", str(live)))[0] == 0
        result = await resume_session(config, sid)
    else:  # the resumed session waits again for the same call (nobody is asked about a second one)
        resumed = asyncio.ensure_future(resume_session(config, sid))
        owned_here = [("awaiting_approval", os.getpid())]  # claimed by this process's resume, and waiting again
        await wait_for(lambda: audit_rows(config, "SELECT status, pid FROM sessions") == owned_here
                       and pending(config, sid), "the resumed session to wait")  # fmt: skip
        assert (await cli("approve", sid, "4.1", "--config", str(live)))[0] == 0
        result = await asyncio.wait_for(resumed, WAIT_S)

    assert result.status == "completed", result.error
    assert audit_rows(config, "SELECT call_id, status FROM tool_calls") == [("4.1", "done")]
    assert audit_rows(config, "SELECT call_id, status_code FROM tool_usage") == [("4.1", "OK")]
    await guarded_mesh.stop_all()  # flushes the access logs
    sent = calls(guarded_mesh.log.getvalue(), "Query")
    assert [(entry["session"], entry["call"]) for entry in sent] == [(sid, "4.1")], "sent exactly once"
    # The resumed turn's model is told what became of the call.
    assert any("was approved and returned" in str(body["messages"]) for body in scripted_llm.chat_requests)


@pytest.mark.parametrize(
    ("agent", "function", "arguments", "method", "resent"),
    [
        ("mole", "database_query_query", {"sql": QUERY}, "Query", False),
        ("safecracker", "calculator_evaluate", {"expression": "6*7"}, "Evaluate", True),
    ],
    ids=["not-idempotent", "idempotent"],
)
async def test_a_call_cut_off_by_kill_9_is_never_repeated_unless_idempotent(
    mesh: InProcessMesh,
    tmp_path: Path,
    scripted_llm: ScriptedLLM,
    agent: str,
    function: str,
    arguments: dict[str, str],
    method: str,
    resent: bool,
) -> None:
    source = write_heist_config(
        tmp_path,
        "cut.yaml",
        llm={"base_url": scripted_llm.base_url, "timeout_s": 30, "max_retries": 0, "tool_calling": "native"},
    )
    live = mesh.write_config(source, tmp_path / "cut-live.yaml")
    config = load_config(live)

    def responder(body: dict[str, Any]) -> Reply:
        if body["messages"][-1]["role"] == "tool":
            return hang(60)  # the call ran; the turn is held before it commits
        if turn_of(body) == agent and body.get("tools"):
            return tool_call(function, arguments)
        return text("Go on.")

    scripted_llm.responder = responder
    sid = f"heist_cut_{agent}"
    proc = start_run(live, sid)
    try:
        await wait_for(lambda: any(body["messages"][-1]["role"] == "tool" for body in scripted_llm.chat_requests),
                       "the tool result to reach the model")  # fmt: skip
    finally:
        kill_9(proc)
    assert audit_rows(config, "SELECT call_id, status FROM tool_calls") == [("3.1" if resent else "4.1", "started")]

    scripted_llm.responder = lambda body: text("Carrying on.")
    result = await resume_session(config, sid)
    assert result.status == "completed", result.error

    await mesh.stop_all()
    logged = [entry["call"] for entry in calls(mesh.log.getvalue(), method) if entry["session"] == sid]
    audited = audit_rows(config, "SELECT call_id, status_code FROM tool_usage WHERE session_id = ? ORDER BY id", sid)
    assert logged == [call_id for call_id, _ in audited], "the access log and the audit agree call for call"
    turn = "3" if resent else "4"
    if resent:
        assert audited == [(f"{turn}.1", "RESULT_UNKNOWN"), (f"{turn}.2", "OK")]
    else:
        assert audited == [(f"{turn}.1", "RESULT_UNKNOWN")]
        told = [str(body) for body in scripted_llm.chat_requests if "result is unknown" in str(body)]
        assert told, "the model is told the call's result is unknown"


async def test_on_a_terminal_run_asks_in_place(
    guarded_mesh: InProcessMesh, guarded: Path, scripted_llm: ScriptedLLM
) -> None:
    """`orchestrator run` on a terminal (a pseudo-terminal here) asks y/n; the answer is audited with the OS user."""
    import pty

    config = guarded_mesh.config
    live = guarded_mesh.write_config(guarded, guarded.parent / "live.yaml")
    scripted_llm.responder = mole_queries
    controller, terminal = pty.openpty()
    command = [str(Path(sys.executable).parent / "orchestrator"), "run", "--config", str(live),
               "--session-id", "heist_tty"]  # fmt: skip
    proc = subprocess.Popen(command, cwd=REPO, stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    seen = b""
    try:
        deadline = time.monotonic() + WAIT_S
        while b"Approve call 4.1? [y/n]" not in seen:
            assert time.monotonic() < deadline, seen.decode(errors="replace")[-2000:]
            ready = await asyncio.to_thread(_read_some, controller)
            seen += ready
        os.write(controller, b"maybe\n")  # not an answer: asked again
        while b"Please answer y or n" not in seen:
            assert time.monotonic() < deadline, seen.decode(errors="replace")[-2000:]
            seen += await asyncio.to_thread(_read_some, controller)
        os.write(controller, b"y\n")
        while proc.poll() is None:
            assert time.monotonic() < deadline, seen.decode(errors="replace")[-2000:]
            seen += await asyncio.to_thread(_read_some, controller)
    finally:
        if proc.poll() is None:
            kill_9(proc)
        os.close(controller)
    assert proc.returncode == 0, seen.decode(errors="replace")[-2000:]
    [(by, call_status)] = audit_rows(config, "SELECT decided_by, status FROM tool_calls WHERE session_id = 'heist_tty'")
    assert call_status == "done" and by == os_user()
    assert audit_rows(config, "SELECT status_code FROM tool_usage WHERE session_id = 'heist_tty'") == [("OK",)]


def _read_some(descriptor: int) -> bytes:
    """What the terminal shows within 0.2 s (b"" if nothing)."""
    import select

    readable, _, _ = select.select([descriptor], [], [], 0.2)
    if not readable:
        return b""
    try:
        return os.read(descriptor, 4096)
    except OSError:  # the process closed the terminal
        return b""


async def test_a_method_the_contract_marks_approval_required_waits_without_any_config(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Policy = the proto option OR the config: here the tests' crew asks for no approval, the contract does."""
    import heist_common.tools.registry as registry

    monkeypatch.setattr(registry, "approval_required", lambda method: method.name == "Evaluate")
    session = mesh.config.session.model_copy(update={"approval_timeout_s": 0.5})
    config = mesh.config.with_overrides(session=session)
    scripted_llm.responder = lambda body: inline_tool("calculator", "6*7") if turn_of(body) == "safecracker" else text(
        "Fine."
    )
    result = await run_session(config, RunOptions(session_id="heist_contract_policy"))
    assert result.status == "completed", result.error
    rows = audit_rows(config, "SELECT tool_name, status_code FROM tool_usage WHERE session_id = ?",
                      "heist_contract_policy")  # fmt: skip
    assert rows == [("calculator", "DENIED")]
