"""prompt_style: transcript, the way the embedded base model is prompted."""

from __future__ import annotations

from pathlib import Path

import pytest
from heist.calculator.v1 import calculator_pb2
from heist.database_query.v1 import database_query_pb2

from heist_common.config import ConfigError, HeistConfig, load_config
from heist_common.layout import REPO_ROOT
from heist_common.tools.registry import ToolRegistry, render_result
from orchestrator.session.runner import RunOptions, run_session
from tests.support.config import TOOLS
from tests.support.inprocess import InProcessMesh, audit_rows
from tests.support.scripted_llm import ScriptedLLM, text


def transcript_config(config: HeistConfig, prefill_tool_every: int = 0, constrained_tools: str = "auto") -> HeistConfig:
    update = dict(prompt_style="transcript", prefill_tool_every=prefill_tool_every, constrained_tools=constrained_tools)
    llm = config.llm.model_copy(update=update)
    return config.with_overrides(llm=llm)


async def test_transcript_prompt_ends_with_the_speaker_and_hides_tool_output(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script(
        text("We go in on Friday."),
        text("[TOOL:file_reader:bank_layout.md]"),
        text("The vault opens at 07:30."),
        text("Guards change at 22:00."),
        text("Good, next step."),
    )
    result = await run_session(transcript_config(mesh.config), RunOptions(turns=5))

    assert result.status == "completed"
    prompts = [body["prompt"] for body in scripted_llm.text_requests]
    assert len(prompts) == 5 and not scripted_llm.chat_requests  # /v1/completions only
    assert prompts[0].endswith("Transcript:\nPlanner:")
    assert prompts[2].endswith("Planner: We go in on Friday.\nSafecracker:")
    # The hacker's tool call ran; its result is in the message and the audit, not in later prompts.
    assert "Harbor Street" in result.turns[1].message
    assert "Harbor Street" not in prompts[2] and "[file_reader" not in prompts[2]
    # Tool agents are taught the marker by an example line derived from the proto's "e.g.".
    assert "Safecracker: [TOOL:calculator:(120 - 15) * 3 / 7]" in prompts[2]
    assert "[TOOL:" not in prompts[0]  # the planner has no tools
    stops = [body["stop"] for body in scripted_llm.text_requests]
    assert all(stop[0] == "\n" for stop in stops)  # one line per turn
    assert len({body["seed"] for body in scripted_llm.text_requests}) == 5  # fresh sampling each call


async def test_prefill_starts_every_nth_tool_turn_with_a_marker(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    # Unconstrained (the model continues the prefill freely); test_constrained_turns.py has it under the grammar.
    scripted_llm.script(
        text("Let's plan."),
        text("bank_layout.md]"),  # hacker, 1st turn: prefilled "[TOOL:file_reader:"
        text("(2 + 3) * 4"),  # safecracker, 1st turn: prefilled, the model forgets the "]"
        text("SELECT name FROM guards LIMIT 1]"),  # mole, 1st turn: prefilled
        text("Next."),
        text("Nothing to read."),  # hacker, 2nd turn: no prefill
    )
    config = transcript_config(mesh.config, prefill_tool_every=2, constrained_tools="off")
    result = await run_session(config, RunOptions(turns=6))

    prompts = [body["prompt"] for body in scripted_llm.text_requests]
    assert not any("grammar" in body for body in scripted_llm.text_requests)
    assert prompts[1].endswith("Hacker: [TOOL:file_reader:")
    assert prompts[2].endswith("Safecracker: [TOOL:calculator:")
    assert prompts[5].endswith("Hacker:")
    assert "(2 + 3) * 4 = 20" in result.turns[2].message
    rows = audit_rows(
        mesh.config, "SELECT agent_name, tool_name, success FROM tool_usage WHERE session_id = ?", result.session_id
    )
    assert rows == [("hacker", "file_reader", 1), ("safecracker", "calculator", 1), ("mole", "database_query", 1)]
    assert result.turns[5].message == "Nothing to read."


async def test_parroted_or_empty_reply_is_resampled_hotter(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script(
        text("We go in on Friday night."),
        text("We go in on Friday night!"),  # hacker parrots the planner
        text(""),  # ... and the first resample says nothing
        text("I will loop the cameras."),
    )
    result = await run_session(transcript_config(mesh.config), RunOptions(turns=2))

    assert result.turns[1].message == "I will loop the cameras."
    temperatures = [body["temperature"] for body in scripted_llm.text_requests]
    base = mesh.config.llm.temperature
    assert temperatures == pytest.approx([base, base, base + 0.3, base + 0.6])


def test_native_tool_calling_needs_chat_prompts(tmp_path: Path) -> None:
    source = load_config(REPO_ROOT / "config" / "heist.yaml")
    assert source.llm.prompt_style == "transcript"  # the shipped default, for the embedded base model
    path = tmp_path / "heist.yaml"
    text_ = (REPO_ROOT / "config" / "heist.yaml").read_text().replace("tool_calling: inline", "tool_calling: native")
    path.write_text(text_.replace("run_dir: var", f"run_dir: {tmp_path}"))
    with pytest.raises(ConfigError, match=r"llm\.tool_calling: native function calling needs prompt_style: chat"):
        load_config(path)


def test_plain_rendering_reads_like_speech() -> None:
    evaluate = calculator_pb2.EvaluateResponse(value=45.0, rendered="(120 - 15) * 3 / 7 = 45")
    assert render_result(evaluate, 200, plain=True) == "value: 45.0; rendered: (120 - 15) * 3 / 7 = 45"
    row = database_query_pb2.Row(
        values=[database_query_pb2.Value(text_value="Bruno"), database_query_pb2.Value(int_value=12)]
    )
    query = database_query_pb2.QueryResponse(columns=["name", "years"], rows=[row, row])
    assert render_result(query, 200, plain=True) == "columns: name, years; rows: Bruno, 12 | Bruno, 12"
    assert render_result(query, 20, plain=True) == "columns: name, ye..."
    assert render_result(evaluate, 200).startswith('{"value":45.0')


def test_inline_examples_come_from_the_proto() -> None:
    registry = ToolRegistry.for_services(TOOLS)
    examples = {
        name: service.inline_method.inline_example
        for name, service in registry.services.items()
        if service.inline_method
    }
    assert examples == {
        "calculator": "(120 - 15) * 3 / 7",
        "file_reader": "bank_layout.md",
        "database_query": "SELECT name, post, shift_start FROM guards",
    }


async def test_a_reply_cut_by_max_tokens_ends_at_its_last_full_sentence(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script(
        text("We go on Friday. The guards change at ten and then we", finish_reason="length"),
        text("bank_layout.md", finish_reason="length"),  # prefilled tool turn: never cut inside the argument
    )
    result = await run_session(transcript_config(mesh.config, prefill_tool_every=1), RunOptions(turns=2))

    assert result.turns[0].message == "We go on Friday."
    assert result.turns[1].message.startswith("[file_reader: bank_layout.md -> filename: bank_layout.md;")


async def test_a_turn_that_stays_silent_is_recorded_as_such(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script(text(""), text(""), text(""))
    result = await run_session(transcript_config(mesh.config), RunOptions(turns=1))

    assert len(scripted_llm.text_requests) == 2  # the first sample and one resample (an empty line gets one)
    assert result.turns[0].message == "(says nothing)" and result.turns[0].status == "empty"
    assert audit_rows(mesh.config, "SELECT message, status FROM messages") == [("(says nothing)", "empty")]
    assert result.status == "failed", "the model never answered"
