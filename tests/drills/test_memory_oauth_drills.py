"""Drills on the memory and OAuth services: killed mid-run, down at start, and back again."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from orchestrator.session.runner import RunOptions, run_session
from tests.drills.script import DrillScript, drill_resilience
from tests.support.processes import ProcessMesh, session_memories
from tests.support.scripted_llm import ScriptedLLM

pytestmark = pytest.mark.drill

TURNS = 12
RESET_S = 0.5


async def test_memory_killed_mid_run_is_rebuilt_from_the_audit(
    drill_mesh: Callable[..., ProcessMesh], scripted_llm: ScriptedLLM
) -> None:
    mesh = drill_mesh(resilience=drill_resilience(threshold=2, reset_s=RESET_S))
    mesh.start()
    memory = mesh.servers["memory"]
    written_during_outage: list[int] = []

    def restart() -> None:
        written_during_outage.append(mesh.rows("SELECT COUNT(*) FROM messages")[0][0])
        memory.start()  # a new process: it comes back empty
        time.sleep(RESET_S + 0.1)  # let the memory circuit's cool-down run out

    scripted_llm.responder = DrillScript().at(4, memory.kill9).at(8, restart)
    result = await run_session(mesh.config, RunOptions(turns=TURNS, session_id="heist_drill_memory"))

    sid = result.session_id
    assert result.status == "completed" and len(result.turns) == TURNS
    assert written_during_outage == [7], "turns 4-7 reached SQLite while the memory service was dead"
    assert mesh.rows("SELECT COUNT(*), SUM(status = 'ok') FROM messages WHERE session_id = ?", sid) == [(TURNS, TURNS)]
    failed = mesh.rows("SELECT DISTINCT status_code FROM events WHERE session_id = ? AND service = 'memory' "
                       "AND turn_id BETWEEN 4 AND 8", sid)
    assert {code for (code,) in failed} >= {"UNAVAILABLE", "CIRCUIT_OPEN"}
    rebuilds = mesh.rows("SELECT turn_id, detail FROM events WHERE session_id = ? AND operation = 'rebuild'", sid)
    assert len(rebuilds) >= 1 and rebuilds[-1][0] >= 8 and "re-stored" in rebuilds[-1][1]
    # The cache matches the source of truth again: every message row is a memory of this session.
    assert session_memories(mesh.config, sid) == TURNS
    assert session_memories(mesh.config, "heist_someone_else") == 0


async def test_oauth_down_at_start_then_back(drill_mesh: Callable[..., ProcessMesh], scripted_llm: ScriptedLLM) -> None:
    mesh = drill_mesh(resilience=drill_resilience(threshold=2, reset_s=RESET_S))
    mesh.start("memory", "calculator", "file_reader", "database_query")  # no OAuth
    oauth = mesh.servers["oauth"]

    def oauth_back() -> None:
        oauth.start()
        time.sleep(RESET_S + 0.1)

    scripted_llm.responder = DrillScript().at(5, oauth_back)
    result = await run_session(mesh.config, RunOptions(turns=TURNS, session_id="heist_drill_oauth"))

    sid = result.session_id
    assert result.status == "completed" and len(result.turns) == TURNS
    assert result.degraded_services == ["oauth"]
    assert ("oauth", "UNREACHABLE") in mesh.rows(
        "SELECT service, status_code FROM events WHERE session_id = ? AND operation = 'health_check'", sid
    )
    # Turns 2-4: no token, so no tools in the prompt, every tool call refused, and the audit says why.
    for turn in result.turns[1:4]:
        system_prompt = scripted_llm.chat_requests[turn.turn_id - 1]["messages"][0]["content"]
        assert "[TOOL:" not in system_prompt
        assert [(row.status_code, row.success) for row in turn.tool_usage] == [("NO_TOKEN", False)]
    why = mesh.rows("SELECT turn_id, status_code, detail FROM events WHERE session_id = ? AND operation = "
                    "'tools_disabled' ORDER BY turn_id", sid)
    # The memory service's token comes from OAuth too, so the breaker may open before turn 2 already.
    assert [turn for turn, _, _ in why] == [2, 3, 4]
    assert {code for _, code, _ in why} <= {"UNAVAILABLE", "CIRCUIT_OPEN"}
    assert all("speaks without tools" in detail and "no OAuth token" in detail for _, _, detail in why)
    # OAuth back during turn 5 (the planner, no tools): the very next turn gets a token and its tool works.
    assert [(row.tool_name, row.status_code) for row in result.turns[5].tool_usage] == [("file_reader", "OK")]
    assert mesh.rows("SELECT COUNT(*) FROM tool_usage WHERE session_id = ? AND turn_id >= 6 AND success = 1", sid) == [
        (6,)
    ]
    assert "[TOOL:" in scripted_llm.chat_requests[5]["messages"][0]["content"]
    oauth.stop()  # a graceful stop flushes the access log (otherwise written every 0.2 s)
    assert oauth.calls("IssueToken") == 4  # one token per tool agent and one for memory, then cached
