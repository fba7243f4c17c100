"""Replica drills: two calculator processes behind one round_robin channel with client-side health checking.

Every agent uses the calculator on every turn, so each turn is one calculator
call. Killing (``kill -9``) or draining (SIGTERM) one replica mid-run must cost
zero failed calls: gRPC stops picking the dead or NOT_SERVING replica and its
retry policy moves a call in flight. A restarted replica gets calls again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from orchestrator.mesh.clients import ServiceClients
from orchestrator.session.runner import RunOptions, SessionResult, run_session
from tests.drills.script import TURN_ORDER, DrillScript, drill_resilience
from tests.support.access_log import calls
from tests.support.processes import ProcessMesh, ServerProcess
from tests.support.scripted_llm import Reply, ScriptedLLM, inline_tool

pytestmark = pytest.mark.drill

TURNS = 16
RECONNECT_WINDOW_S = ServiceClients.RECONNECT_BACKOFF_MS[1] / 1000 * 1.2 + 0.5
"""Longest the channel backs off before redialling a restarted replica, plus its first health answer."""
CALCULATING_CREW = [
    {"name": name, "role": name.title(), "system_prompt": "You do the numbers.", "tools": ["calculator"],
     "oauth_client": "crew"}
    for name in TURN_ORDER
]  # fmt: skip
"""Every crew member uses the calculator (as the ``crew`` OAuth client, which has calculator:use)."""


def calculate(turn: int) -> Reply:
    return inline_tool("calculator", f"{turn}*7", before=f"Turn {turn}: checking.")


def calculator_codes(result: SessionResult) -> list[str]:
    return [row.status_code or "" for turn in result.turns for row in turn.tool_usage if row.tool_name == "calculator"]


def served(replica: ServerProcess, start: int = 1) -> int:
    """OK Evaluate calls in the replica's log during its ``start``-th run."""
    text = replica.log().split(f"=== start {start}\n", 1)[1].split(f"=== start {start + 1}\n", 1)[0]
    return len(calls(text, "Evaluate", "OK"))


@pytest.fixture
def two_calculators(drill_mesh: Callable[..., ProcessMesh]) -> ProcessMesh:
    mesh = drill_mesh(
        replicas={"calculator": 2},
        agents=CALCULATING_CREW,
        resilience=drill_resilience(threshold=3, reset_s=5.0),
    )
    assert len(mesh.config.service("calculator").replica_addresses) == 2
    return mesh.start()


def drill(scripted_llm: ScriptedLLM) -> DrillScript:
    replies: dict[str, Callable[[int], Any]] = {name: calculate for name in TURN_ORDER}
    script = DrillScript(replies)
    scripted_llm.responder = script
    return script


async def test_kill9_one_replica_no_call_fails_and_calls_return_after_restart(
    two_calculators: ProcessMesh, scripted_llm: ScriptedLLM
) -> None:
    first, second = two_calculators.replicas["calculator"]
    assert second.port == first.port + 100

    def restart() -> None:
        second.start()
        time.sleep(RECONNECT_WINDOW_S)

    drill(scripted_llm).at(5, second.kill9).at(10, restart)
    result = await run_session(two_calculators.config, RunOptions(turns=TURNS, session_id="heist_drill_replica_kill"))

    assert result.status == "completed" and len(result.turns) == TURNS
    codes = calculator_codes(result)
    assert codes == ["OK"] * TURNS, codes
    first.stop()
    second.stop()  # graceful stops flush the access logs
    assert served(second, start=2) >= 1, "the restarted replica gets calls again"
    # Turns 1-4 were shared; kill -9 may lose the victim's last unflushed log lines (at most its two calls).
    after_kill = TURNS - 4
    restarted = served(second, start=2)
    assert served(first) >= after_kill - restarted, "every call after the kill went to the survivor or the restarted"
    assert TURNS - 2 <= served(first) + served(second, start=1) + restarted <= TURNS

async def test_sigterm_drains_one_replica_without_a_failed_call(
    two_calculators: ProcessMesh, scripted_llm: ScriptedLLM
) -> None:
    first, second = two_calculators.replicas["calculator"]

    def drain() -> None:
        assert second.process is not None
        second.process.terminate()  # drain: NOT_SERVING, in-flight calls finish, then exit

    drill(scripted_llm).at(5, drain)
    result = await run_session(two_calculators.config, RunOptions(turns=TURNS, session_id="heist_drill_replica_drain"))

    assert result.status == "completed" and len(result.turns) == TURNS
    assert calculator_codes(result) == ["OK"] * TURNS
    assert second.process is not None and second.process.wait(timeout=10) == 0
    first.stop()
    before_drain = served(second)
    assert 1 <= before_drain <= 4, "both replicas shared turns 1-4, and the drained one got nothing after"
    assert served(first) == TURNS - before_drain
