"""Chat style against the real embedded server (llama-server, Gemma 3 270M): native function calls, inline markers.

What the scripted endpoint cannot prove: that the server accepts the messages
we send after a tool call (``"content": ""``, not null, which llama-cpp-python's
refused with HTTP 500), strict tool definitions with ``tool_choice: "required"``,
and the grammar of the inline style, with the template ``make serve`` gives it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from heist_common.config import load_config
from orchestrator.llm.client import Completion, LLMClient, NativeToolCall
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


async def play_chat_heist(
    llama: LlamaServer, tmp_path: Path, session_id: str, turns: int, **llm: object
) -> list[str]:
    """Play a chat-style heist on the real server, check every request was answered; return its tool calls' codes."""
    config = load_config(write_heist_config(tmp_path, llm_base_url=llama.base_url))
    mesh = InProcessMesh(config)
    await mesh.start_all()
    try:
        mesh.config = mesh.with_llm(
            llama.base_url, prompt_style="chat", timeout_s=120, health_timeout_s=60, max_tokens=40, **llm
        )
        result = await run_session(mesh.config, RunOptions(turns=turns, session_id=session_id))
    finally:
        await mesh.stop_all()

    assert result.status == "completed", result.error
    # The constraint insists: a server refusing it would make these turns LLM errors.
    assert "error" not in [turn.status for turn in result.turns], [(t.status, t.message) for t in result.turns]
    for turn in result.turns:
        timings = audit_rows(
            mesh.config, "SELECT timings FROM messages WHERE session_id = ? AND turn_id = ?", session_id, turn.turn_id
        )[0][0]
        llm_steps = [step for step in json.loads(timings)["steps"] if step[0] == "llm"]
        assert llm_steps and all("OK" in step for step in llm_steps), llm_steps
    calls = audit_rows(mesh.config, "SELECT status_code FROM tool_usage WHERE session_id = ?", session_id)
    return [code for (code,) in calls]


async def test_a_native_heist_with_strict_schemas_and_forced_calls_is_accepted(
    llama: LlamaServer, tmp_path: Path
) -> None:
    """Strict tool definitions, ``tool_choice: "required"`` with the one function: every request is answered."""
    codes = await play_chat_heist(
        llama, tmp_path, "heist_chat_native_real", 3,
        tool_calling="native", constrained_tools="json_schema", prefill_tool_every=1,
    )  # fmt: skip
    # Whatever the model called went through the strict schema: the services accept every argument.
    assert all(code == "OK" for code in codes), codes


async def test_the_request_after_a_tool_call_is_accepted(llama: LlamaServer, tmp_path: Path) -> None:
    """The assistant's tool call goes back with ``"content": ""`` and the tool's result: the server answers it."""
    config = load_config(write_heist_config(tmp_path, llm_base_url=llama.base_url))
    llm_config = config.llm.model_copy(update={"base_url": llama.base_url, "max_tokens": 16, "timeout_s": 120})
    call = Completion(content="", tool_calls=[NativeToolCall("call_1", "calculator_evaluate", '{"expression": "2+3"}')])
    assistant = call.assistant_message()
    assert assistant["content"] == ""
    messages = [
        {"role": "system", "content": "You crack safes."},
        {"role": "user", "content": "What is 2+3?"},
        assistant,
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    functions = [
        {"type": "function", "function": {"name": "calculator_evaluate", "description": "Evaluate arithmetic.",
                                          "parameters": {"type": "object", "properties": {
                                              "expression": {"type": "string"}}, "required": ["expression"]}}}
    ]  # fmt: skip
    client = LLMClient(llm_config)
    try:
        answer = await client.complete(messages, functions, final=True)
    finally:
        await client.close()
    assert not answer.tool_calls and isinstance(answer.content, str)


async def test_chat_with_inline_markers_under_the_grammar_is_accepted(llama: LlamaServer, tmp_path: Path) -> None:
    """Chat style, inline markers: every request carries the reply's grammar, which the real server must take."""
    codes = await play_chat_heist(
        llama, tmp_path, "heist_chat_inline_real", 4,
        tool_calling="inline", constrained_tools="grammar", prefill_tool_every=0,
    )  # fmt: skip
    # Whatever markers the model wrote named an argument its tool accepts (or another agent's tool: refused).
    assert all(code in ("OK", "NOT_ALLOWED") for code in codes), codes
