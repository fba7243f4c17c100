"""Honest turns: an empty reply is resampled once, then recorded ``empty``, counted as an error and by the breaker.

Also the chat wire details that a real llama.cpp server insists on: the
assistant message before tool results carries ``"content": ""`` (never null),
and tool agents are made to call a tool every ``prefill_tool_every`` turns.
"""

from __future__ import annotations

import pytest

from orchestrator.cli import _print_summary
from orchestrator.session.runner import RunOptions, run_session
from tests.support.inprocess import InProcessMesh, audit_rows
from tests.support.scripted_llm import ScriptedLLM, text, tool_call


def _breaker(mesh: InProcessMesh, failures: int) -> None:
    mesh.config = mesh.config.with_overrides(
        resilience=mesh.config.resilience.model_copy(update=dict(llm_max_consecutive_failures=failures))
    )


def _transcript(mesh: InProcessMesh) -> None:
    mesh.config = mesh.config.with_overrides(
        llm=mesh.config.llm.model_copy(update=dict(prompt_style="transcript", prefill_tool_every=0))
    )


@pytest.mark.parametrize("empty", ["", "   "])
async def test_an_empty_chat_reply_is_resampled_hotter_once(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM, empty: str
) -> None:
    scripted_llm.script(text(empty), text("We go on Friday."))
    result = await run_session(mesh.config, RunOptions(turns=1))

    assert result.status == "completed" and result.exit_code == 0
    assert [turn.status for turn in result.turns] == ["ok"]
    assert result.turns[0].message == "We go on Friday."
    assert result.errors == 0 and result.empty_turns == 0
    temperatures = [body["temperature"] for body in scripted_llm.chat_requests]
    base = mesh.config.llm.temperature
    assert temperatures == pytest.approx([base, base + 0.3])


async def test_an_empty_transcript_line_is_resampled_once(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    _transcript(mesh)
    scripted_llm.script(text("   "), text("We go on Friday."))
    result = await run_session(mesh.config, RunOptions(turns=1))

    assert [turn.status for turn in result.turns] == ["ok"]
    assert result.turns[0].message == "We go on Friday."
    assert len(scripted_llm.text_requests) == 2


async def test_a_reply_that_stays_empty_is_an_error_not_an_answer(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM, capsys: pytest.CaptureFixture[str]
) -> None:
    _breaker(mesh, 3)
    scripted_llm.script(text("We go on Friday."), text(""), text("  "), text("I loop the cameras."))
    result = await run_session(mesh.config, RunOptions(turns=3, session_id="heist_one_empty"))

    assert [turn.status for turn in result.turns] == ["ok", "empty", "ok"]
    assert result.turns[1].message == "(says nothing)"
    assert result.empty_turns == 1 and result.errors == 1
    assert result.status == "completed", "one empty turn among answers does not fail the session"
    rows = audit_rows(
        mesh.config, "SELECT status FROM messages WHERE session_id = ? ORDER BY turn_id", "heist_one_empty"
    )
    assert rows == [("ok",), ("empty",), ("ok",)]
    events = audit_rows(
        mesh.config, "SELECT service, status_code, turn_id FROM events WHERE session_id = ? AND status_code = 'EMPTY'",
        "heist_one_empty",
    )  # fmt: skip
    assert events == [("llm", "EMPTY", 2)]
    _print_summary(result)
    assert "Errors:     1 (1 empty reply)" in capsys.readouterr().out


@pytest.mark.parametrize("style", ["chat", "transcript"])
async def test_a_model_that_only_says_nothing_trips_the_breaker_and_fails(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM, capsys: pytest.CaptureFixture[str], style: str
) -> None:
    if style == "transcript":
        _transcript(mesh)
    _breaker(mesh, 3)
    scripted_llm.default = text("")
    result = await run_session(mesh.config, RunOptions(turns=8, session_id="heist_mute"))

    assert result.status == "failed" and result.exit_code == 1
    assert [turn.status for turn in result.turns] == ["empty"] * 3, "the breaker stops at the third empty turn"
    assert result.error is not None and "3 turns in a row failed (last: an empty reply)" in result.error
    requests = scripted_llm.chat_requests if style == "chat" else scripted_llm.text_requests
    assert len(requests) == 6, "each turn: one sample, one resample"
    assert audit_rows(mesh.config, "SELECT status FROM sessions WHERE session_id = ?", "heist_mute") == [("failed",)]
    _print_summary(result)
    assert "Errors:     3 (3 empty replies)" in capsys.readouterr().out


async def test_every_turn_empty_is_never_completed(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    _breaker(mesh, 10)  # the breaker never trips: the "no turn was answered" rule decides
    scripted_llm.default = text(" ")
    result = await run_session(mesh.config, RunOptions(turns=2, session_id="heist_mute_short"))

    assert [turn.status for turn in result.turns] == ["empty", "empty"]
    assert result.status == "failed" and result.exit_code == 1
    assert result.error is not None and "no turn was answered" in result.error


async def test_the_assistant_message_before_tool_results_has_empty_content(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM
) -> None:
    mesh.config = mesh.with_llm(scripted_llm.base_url, tool_calling="native", constrained_tools="off")
    # The planner speaks, then the hacker (file_reader) calls a function and answers from its result.
    scripted_llm.script(
        text("We go on Friday."), tool_call("file_reader_read_file", filename="bank_layout.md"), text("Vault is east.")
    )
    result = await run_session(mesh.config, RunOptions(turns=2))

    assert [turn.status for turn in result.turns] == ["ok", "ok"]
    follow_up = scripted_llm.chat_requests[2]["messages"]
    assistant = next(message for message in follow_up if message.get("tool_calls"))
    assert assistant["content"] == "" and assistant["role"] == "assistant"
    assert follow_up[-1]["role"] == "tool"


async def test_tool_agents_are_made_to_call_a_function_every_nth_turn(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM
) -> None:
    mesh.config = mesh.with_llm(
        scripted_llm.base_url, tool_calling="native", constrained_tools="off", prefill_tool_every=2
    )
    safecracker = next(agent for agent in mesh.config.agents if agent.name == "safecracker")
    mesh.config = mesh.config.with_overrides(agents=(safecracker,))
    mesh.config = mesh.config.with_overrides(
        session=mesh.config.session.model_copy(update=dict(turn_order=("safecracker",)))
    )
    scripted_llm.responder = lambda body: (
        tool_call("calculator_evaluate", expression="2+3")
        if body.get("tool_choice") == "required"
        else text("Five minutes.")
    )
    result = await run_session(mesh.config, RunOptions(turns=5))

    assert [turn.status for turn in result.turns] == ["ok"] * 5
    first_requests = [body for body in scripted_llm.chat_requests if body["messages"][-1]["role"] != "tool"]
    choices = [body.get("tool_choice") for body in first_requests]
    assert choices == ["required", "auto", "required", "auto", "required"], "turns 1, 3 and 5 of the agent are forced"
    for body in first_requests[::2]:  # the forced function offered alone, one call
        assert [tool["function"]["name"] for tool in body["tools"]] == ["calculator_evaluate"]
        assert body["parallel_tool_calls"] is False
    follow_ups = [body.get("tool_choice") for body in scripted_llm.chat_requests if body not in first_requests]
    assert follow_ups == ["auto"] * 3, "the model answers the results freely"
    assert [len(turn.tool_usage) for turn in result.turns] == [1, 0, 1, 0, 1]


async def test_no_forcing_when_prefill_tool_every_is_zero(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    mesh.config = mesh.with_llm(scripted_llm.base_url, tool_calling="native", prefill_tool_every=0)
    await run_session(mesh.config, RunOptions(turns=4))

    assert all(body.get("tool_choice") in (None, "auto") for body in scripted_llm.chat_requests)
