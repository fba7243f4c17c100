"""Chat style against the real embedded server (llama-server, Gemma 3 270M): native function calls, inline markers.

What the scripted endpoint cannot prove: that the server accepts the messages
we send after a tool call (``"content": ""``, not null, which it refuses with
HTTP 500), and that a forced ``tool_choice`` with strict schemas makes the
270M model call the agent's tool with arguments the service accepts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from heist_common.config import load_config
from orchestrator.session.runner import RunOptions, run_session
from tests.bench.llm_e2e import LlamaServer
from tests.support.config import write_heist_config
from tests.support.inprocess import InProcessMesh, audit_rows

pytestmark = pytest.mark.llm


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    log = tmp_path_factory.mktemp("llama") / "llm.log"
    server = LlamaServer(log)  # as `make serve` starts it
    try:
        yield server.start()
    finally:
        server.stop()


async def test_forced_native_tool_calls_and_their_follow_ups_are_accepted(llama: LlamaServer, tmp_path: Path) -> None:
    config = load_config(write_heist_config(tmp_path, llm_base_url=llama.base_url))
    mesh = InProcessMesh(config)
    await mesh.start_all()
    try:
        mesh.config = mesh.with_llm(
            llama.base_url, prompt_style="chat", tool_calling="native", constrained_tools="json_schema",
            prefill_tool_every=1, timeout_s=120, health_timeout_s=60, max_tokens=40,
        )  # fmt: skip
        result = await run_session(mesh.config, RunOptions(turns=3, session_id="heist_chat_native_real"))
    finally:
        await mesh.stop_all()

    assert result.status == "completed", result.error
    assert [turn.status for turn in result.turns] == ["ok", "ok", "ok"]
    # The hacker and the safecracker were made to call their tool; strict schemas kept the arguments valid.
    calls = audit_rows(
        mesh.config, "SELECT agent_name, tool_name, status_code FROM tool_usage WHERE session_id = ? ORDER BY id",
        "heist_chat_native_real",
    )  # fmt: skip
    assert [(agent, tool) for agent, tool, _ in calls][:2] == [("hacker", "file_reader"), ("safecracker", "calculator")]
    assert all(code == "OK" for _, _, code in calls), calls
    # Each tool turn is two chat requests, the follow-up carrying the assistant's tool call: both answered.
    for turn in result.turns[1:]:
        timings = audit_rows(
            mesh.config, "SELECT timings FROM messages WHERE session_id = ? AND turn_id = ?",
            "heist_chat_native_real", turn.turn_id,
        )[0][0]  # fmt: skip
        llm_steps = [step for step in json.loads(timings)["steps"] if step[0] == "llm"]
        assert len(llm_steps) == 2 and all("OK" in step for step in llm_steps), llm_steps


async def test_chat_with_inline_markers_under_the_grammar_is_accepted(llama: LlamaServer, tmp_path: Path) -> None:
    """Chat style, inline markers: every request carries the reply's grammar, which the real server must take."""
    config = load_config(write_heist_config(tmp_path, llm_base_url=llama.base_url))
    mesh = InProcessMesh(config)
    await mesh.start_all()
    try:
        mesh.config = mesh.with_llm(
            llama.base_url, prompt_style="chat", tool_calling="inline", constrained_tools="grammar",
            prefill_tool_every=0, timeout_s=120, health_timeout_s=60, max_tokens=40,
        )  # fmt: skip
        result = await run_session(mesh.config, RunOptions(turns=4, session_id="heist_chat_inline_real"))
    finally:
        await mesh.stop_all()

    assert result.status == "completed", result.error
    # `grammar` insists: a server refusing the field would make every turn an LLM error.
    assert "error" not in [turn.status for turn in result.turns], [(t.status, t.message) for t in result.turns]
    for turn in result.turns:
        timings = audit_rows(
            mesh.config, "SELECT timings FROM messages WHERE session_id = ? AND turn_id = ?",
            "heist_chat_inline_real", turn.turn_id,
        )[0][0]  # fmt: skip
        llm_steps = [step for step in json.loads(timings)["steps"] if step[0] == "llm"]
        assert llm_steps and all("OK" in step for step in llm_steps), llm_steps
    # Whatever markers the model wrote named an argument its tool accepts (or another agent's tool: refused).
    calls = audit_rows(mesh.config, "SELECT status_code FROM tool_usage WHERE session_id = ?", "heist_chat_inline_real")
    assert all(code in ("OK", "NOT_ALLOWED") for (code,) in calls), calls
