"""Drills on tool servers: kill -9 and restart, SIGSTOP past the deadline, and the circuit breaker."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from heist_common.exit_codes import ExitCode
from orchestrator.mesh.clients import ServiceClients
from orchestrator.session.runner import RunOptions, SessionResult, run_session
from tests.drills.script import DrillScript, drill_resilience
from tests.support.access_log import calls
from tests.support.processes import ProcessMesh
from tests.support.scripted_llm import Reply, ScriptedLLM, inline_tool

pytestmark = pytest.mark.drill

TURNS = 12
RECONNECT_WINDOW_S = ServiceClients.RECONNECT_BACKOFF_MS[1] / 1000 * 1.2 + 0.1
"""Longest a channel backs off before it redials a restarted server (max backoff plus gRPC's 20% jitter)."""


def calls_of(result: SessionResult, tool: str) -> list[tuple[int, str, float]]:
    """``(turn, status_code, latency_ms)`` of every call to ``tool``."""
    return [
        (turn.turn_id, row.status_code or "", row.latency_ms or 0.0)
        for turn in result.turns
        for row in turn.tool_usage
        if row.tool_name == tool
    ]


async def test_kill9_tool_server_then_restart_on_same_port(
    drill_mesh: Callable[..., ProcessMesh], scripted_llm: ScriptedLLM
) -> None:
    mesh = drill_mesh(resilience=drill_resilience(threshold=10, reset_s=1.0))  # breaker out of play here
    mesh.start()
    calculator = mesh.servers["calculator"]
    first_pid = calculator.pid

    def restart() -> None:
        calculator.start()
        time.sleep(RECONNECT_WINDOW_S)  # the orchestrator's channel redials within this window, by design

    scripted_llm.responder = DrillScript().at(3, calculator.kill9).at(6, restart)
    result = await run_session(mesh.config, RunOptions(turns=TURNS, session_id="heist_drill_kill9"))

    assert result.status == "completed" and len(result.turns) == TURNS
    assert calculator.pid != first_pid
    assert calculator.port == mesh.config.service("calculator").port
    calc = calls_of(result, "calculator")
    assert [(turn, code) for turn, code, _ in calc] == [(3, "UNAVAILABLE"), (7, "OK"), (11, "OK")]
    assert calc[0][2] < 500, "a dead server fails fast, it does not eat the deadline"
    # The other tools never noticed.
    assert {code for _, code, _ in calls_of(result, "file_reader") + calls_of(result, "database_query")} == {"OK"}
    assert len(calls_of(result, "file_reader")) == 3 and len(calls_of(result, "database_query")) == 3

    sid = result.session_id
    assert mesh.rows("SELECT turn_id, success, status_code FROM tool_usage WHERE session_id = ? AND tool_name = "
                     "'calculator' ORDER BY turn_id", sid) == [(3, 0, "UNAVAILABLE"), (7, 1, "OK"), (11, 1, "OK")]
    assert mesh.rows("SELECT turn_id, status_code FROM events WHERE session_id = ? AND service = 'calculator' "
                     "AND turn_id IS NOT NULL", sid) == [
        (3, "UNAVAILABLE")
    ]
    assert mesh.rows("SELECT COUNT(*), MIN(turn_id), MAX(turn_id) FROM messages WHERE session_id = ?", sid) == [
        (TURNS, 1, TURNS)
    ]
    calculator.stop()  # a graceful stop flushes the access log (otherwise written every 0.2 s)
    restarted_log = calculator.log().split("=== start 2")[1]
    restarted = calls(restarted_log, "Evaluate", "OK")
    assert len(restarted) == 2 and all(entry["session"] == sid for entry in restarted)


async def test_sigstop_tool_server_deadline_exceeded_within_deadline(
    drill_mesh: Callable[..., ProcessMesh], scripted_llm: ScriptedLLM
) -> None:
    deadline_s = 0.8
    mesh = drill_mesh(resilience=drill_resilience(threshold=2, reset_s=30.0), deadlines={"calculator": deadline_s})
    mesh.start()
    calculator = mesh.servers["calculator"]
    scripted_llm.responder = DrillScript().at(3, calculator.freeze)
    result = await run_session(mesh.config, RunOptions(turns=TURNS, session_id="heist_drill_sigstop"))

    # Frozen before its first call, the calculator never answered: the session ran, but honestly degraded.
    assert result.status == "degraded" and result.exit_code == ExitCode.DEGRADED and len(result.turns) == TURNS
    assert [(u.service, u.attempts, u.code) for u in result.unusable] == [("calculator", 3, "DEADLINE_EXCEEDED")]
    calc = calls_of(result, "calculator")
    assert [(turn, code) for turn, code, _ in calc] == [(3, "DEADLINE_EXCEEDED"), (7, "DEADLINE_EXCEEDED"),
                                                         (11, "CIRCUIT_OPEN")]
    deadline_ms = deadline_s * 1000
    for turn_id in (3, 7):
        latency = next(ms for t, _, ms in calc if t == turn_id)
        total = result.turns[turn_id - 1].total_ms
        assert deadline_ms * 0.95 <= latency <= deadline_ms + 250, latency
        assert total <= deadline_ms + 500, f"turn {turn_id} took {total:.0f} ms"
    # Two deadline failures opened the circuit: turn 11 no longer waits for the frozen server.
    assert calc[2][2] < 20 and result.turns[10].total_ms < 300
    assert mesh.rows("SELECT turn_id, success, tool_result FROM tool_usage WHERE session_id = ? AND tool_name = "
                     "'calculator' ORDER BY turn_id", result.session_id)[2] == (11, 0, "circuit open")
    assert {code for _, code, _ in calls_of(result, "file_reader")} == {"OK"}


async def test_circuit_breaker_skips_a_dead_service_then_one_trial_closes_it(
    drill_mesh: Callable[..., ProcessMesh], scripted_llm: ScriptedLLM
) -> None:
    reset_s = 1.5
    # Two calculator users, so most turns call the calculator: planner, safecracker, safecracker_b, ...
    agents = [
        {"name": "planner", "role": "Mastermind", "system_prompt": "Plan.", "tools": [], "scopes": ["simulation:read"]},
        {"name": "safecracker", "role": "Safecracker", "system_prompt": "Count.", "tools": ["calculator"]},
        {"name": "safecracker_b", "role": "Second safecracker", "system_prompt": "Count too.",
         "tools": ["calculator"], "oauth_client": "safecracker"},
    ]
    mesh = drill_mesh(resilience=drill_resilience(threshold=2, reset_s=reset_s), agents=agents)
    mesh.start()
    calculator = mesh.servers["calculator"]
    two_calls = Reply(content="Two sums: [TOOL:calculator:6*7] and [TOOL:calculator:2+2]")
    script = DrillScript({"safecracker_b": lambda turn: inline_tool("calculator", "2+2")})
    script.at(3, calculator.kill9).at(6, calculator.start)  # back up while the circuit is still open
    script.at(7, lambda: time.sleep(reset_s + 0.1)).reply_at(8, two_calls)  # cool-down over: half-open at turn 8
    scripted_llm.responder = script
    result = await run_session(mesh.config, RunOptions(turns=TURNS, session_id="heist_drill_breaker"))

    assert result.status == "completed" and len(result.turns) == TURNS
    calc = calls_of(result, "calculator")
    assert sorted((turn, code) for turn, code, _ in calc) == [
        (2, "OK"),
        (3, "UNAVAILABLE"),
        (5, "UNAVAILABLE"),  # threshold reached: open
        (6, "CIRCUIT_OPEN"),  # skipped although the server is back: still cooling down
        (8, "CIRCUIT_OPEN"),  # half-open admits exactly one call: the concurrent twin is refused...
        (8, "OK"),  # ...and the one trial call succeeds and closes the circuit
        (9, "OK"),
        (11, "OK"),
        (12, "OK"),
    ]
    assert all(ms < 20 for _, code, ms in calc if code == "CIRCUIT_OPEN"), calc
    sid = result.session_id
    skipped = mesh.rows("SELECT turn_id, success, tool_result FROM tool_usage WHERE session_id = ? AND "
                        "status_code = 'CIRCUIT_OPEN' ORDER BY turn_id", sid)
    assert [(t, ok) for t, ok, _ in skipped] == [(6, 0), (8, 0)] and skipped[0][2] == "circuit open"
    assert mesh.rows("SELECT turn_id FROM events WHERE session_id = ? AND service = 'calculator' AND "
                     "status_code = 'CIRCUIT_OPEN' ORDER BY turn_id", sid) == [(6,), (8,)]
    # The restarted server saw no call while the circuit was open: only the trial (turn 8) and turns 9-12.
    calculator.stop()  # a graceful stop flushes the access log (otherwise written every 0.2 s)
    restarted_log = calculator.log().split("=== start 2")[1]
    assert len(calls(restarted_log, "Evaluate", "OK")) == 4, restarted_log
