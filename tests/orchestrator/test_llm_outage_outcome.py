"""An honest outcome when the model cannot speak: the LLM's circuit breaker and the start-up probe.

The seed's rule stays for a transient failure (the error becomes the turn's
message and the run goes on); a model that keeps failing, or cannot complete at
start, ends the session ``failed`` with exit code 1, never ``completed``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from heist_common.config import load_config
from orchestrator.cli import main
from orchestrator.session.runner import RunOptions, run_session
from orchestrator.turn.turn import Turn
from tests.support.config import write_heist_config
from tests.support.inprocess import InProcessMesh, audit_rows
from tests.support.ports import free_port
from tests.support.scripted_llm import ScriptedLLM, http_error, text


def _with_breaker(mesh: InProcessMesh, base_url: str, failures: int = 3) -> InProcessMesh:
    config = mesh.with_llm(base_url, timeout_s=2.0, max_retries=0)
    mesh.config = config.with_overrides(
        resilience=config.resilience.model_copy(update=dict(llm_max_consecutive_failures=failures))
    )
    return mesh


async def test_llm_dies_mid_run_fails_the_session(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    _with_breaker(mesh, scripted_llm.base_url)
    scripted_llm.responder = lambda body: text("We go on Friday.")
    died = threading.Event()

    def kill_after_turn_2(turn: Turn) -> None:
        if turn.turn_id == 2:  # the model server dies before turn 3 of 12
            scripted_llm.stop()
            died.set()

    result = await run_session(
        mesh.config, RunOptions(turns=12, session_id="heist_llm_dies"), on_turn=kill_after_turn_2
    )

    assert died.is_set()
    assert result.status == "failed" and result.exit_code == 1
    assert result.error is not None and "cannot answer" in result.error and "3 turns in a row failed" in result.error
    statuses = [turn.status for turn in result.turns]
    assert statuses[:2] == ["ok", "ok"]
    assert statuses[2:] == ["llm_error"] * 3, "at most llm_max_consecutive_failures error turns after the death"
    rows = audit_rows(mesh.config, "SELECT status, error FROM sessions WHERE session_id = ?", "heist_llm_dies")
    assert rows[0][0] == "failed" and "3 turns in a row failed" in rows[0][1]
    assert len(audit_rows(mesh.config, "SELECT 1 FROM messages WHERE session_id = ?", "heist_llm_dies")) == 5


async def test_one_transient_500_still_completes(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    _with_breaker(mesh, scripted_llm.base_url)
    scripted_llm.script(text("Friday."), http_error(500, "hiccup"), text("Back again."))
    result = await run_session(mesh.config, RunOptions(turns=4, session_id="heist_llm_hiccup"))
    assert result.status == "completed" and result.exit_code == 0
    assert [turn.status for turn in result.turns] == ["ok", "llm_error", "ok", "ok"]
    assert result.turns[1].message == "Error generating response: HTTP 500: hiccup"


async def test_llm_unreachable_at_start_fails_within_seconds(mesh: InProcessMesh) -> None:
    nobody = f"http://127.0.0.1:{free_port()}/v1"
    _with_breaker(mesh, nobody)
    started = time.monotonic()
    result = await run_session(mesh.config, RunOptions(turns=8, session_id="heist_llm_gone"))
    assert time.monotonic() - started < 5.0
    assert result.status == "failed" and result.exit_code == 1 and result.turns == []
    llm = next(health for health in result.health if health.service == "llm")
    assert llm.status == "DOWN" and "cannot reach" in llm.detail
    rows = audit_rows(mesh.config, "SELECT status FROM sessions WHERE session_id = ?", "heist_llm_gone")
    assert rows == [("failed",)]


async def test_llm_up_but_cannot_complete_is_down(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    """The crash this guards against: the model is listed, and the first completion fails."""
    _with_breaker(mesh, scripted_llm.base_url)
    scripted_llm.probe_status = 500
    result = await run_session(mesh.config, RunOptions(turns=4, session_id="heist_llm_mute"))
    assert result.status == "failed" and result.exit_code == 1
    llm = next(health for health in result.health if health.service == "llm")
    assert llm.status == "DOWN" and "HTTP 500" in llm.detail
    assert scripted_llm.chat_requests == [] and len(scripted_llm.probe_requests) == 1
    assert scripted_llm.probe_requests[0]["max_tokens"] == 1


async def test_model_that_never_spoke_is_not_completed(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    _with_breaker(mesh, scripted_llm.base_url, failures=5)
    scripted_llm.script(http_error(500, "no"), http_error(500, "still no"))
    result = await run_session(mesh.config, RunOptions(turns=2, session_id="heist_llm_silent"))
    assert result.status == "failed" and result.exit_code == 1
    assert result.error is not None and "no turn was answered" in result.error


async def test_cli_run_exits_1_and_names_the_embedded_log(
    tmp_path: Path, mesh: InProcessMesh, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_heist_config(
        tmp_path,
        llm={"embedded": True, "base_url": f"http://127.0.0.1:{free_port()}/v1", "timeout_s": 1, "max_retries": 0},
    )
    live = mesh.write_config(source, tmp_path / "live.yaml")
    code = await asyncio.to_thread(main, ["run", "--config", str(live), "--turns", "3"])
    captured = capsys.readouterr()
    assert code == 1
    assert "(failed)" in captured.out
    log_path = load_config(live).mesh.log_dir / "llm.log"
    assert str(log_path) in captured.err and "cannot answer" in captured.err
