"""Whole sessions against in-process servers and the scripted LLM."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

from heist_common.config import load_config
from orchestrator.session.runner import RunOptions, SessionRunner, run_session
from tests.support.config import write_heist_config
from tests.support.inprocess import InProcessMesh, SessionHarness, audit_rows
from tests.support.scripted_llm import ScriptedLLM, inline_tool, text, tool_call


async def test_inline_session_writes_complete_audit_trail(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script(
        text("Plan: Friday night."),
        inline_tool("file_reader", "bank_layout.md"),
        inline_tool("calculator", "(120-15)*3"),
        inline_tool("database_query", "SELECT name FROM guards LIMIT 2"),
    )
    result = await run_session(mesh.config, RunOptions())

    assert result.status == "completed" and result.exit_code == 0
    assert re.fullmatch(r"heist_\d{8}_\d{6}_[0-9a-f]{16}", result.session_id)
    assert [t.agent_name for t in result.turns] == ["planner", "hacker", "safecracker", "mole"]
    assert "(120-15)*3 = 315" in result.turns[2].message
    assert result.tool_calls_ok == 3 and result.tool_calls_failed == 0
    rows = audit_rows(
        mesh.config, "SELECT turn_id, agent_name, agent_role FROM messages WHERE session_id = ?", result.session_id
    )
    assert rows == [
        (1, "planner", "Mastermind"),
        (2, "hacker", "Hacker"),
        (3, "safecracker", "Safecracker"),
        (4, "mole", "Inside Man"),
    ]
    tools = audit_rows(mesh.config, "SELECT agent_name, tool_name, tool_params, success FROM tool_usage ORDER BY id")
    assert tools[1] == ("safecracker", "calculator", '{"expression": "(120-15)*3"}', 1)
    health = audit_rows(mesh.config, "SELECT service, status_code FROM events WHERE operation = 'health_check'")
    assert sorted(health) == sorted(
        [(s, "SERVING") for s in ("oauth", "memory", "calculator", "file_reader", "database_query", "llm")]
    )
    assert audit_rows(mesh.config, "SELECT status, num_turns FROM sessions") == [("completed", 4)]
    assert [p.suffix for p in result.exports] == [".json", ".md"]
    exported = json.loads(result.exports[0].read_text())
    assert len(exported["messages"]) == 4 and len(exported["tool_usage"]) == 3
    # The inline convention is explained to tool agents; the model itself never gets `tools`.
    systems = [r["messages"][0]["content"] for r in scripted_llm.chat_requests]
    assert "[TOOL:" not in systems[0] and "[TOOL:<tool>:<argument>]" in systems[1]
    assert all("tools" not in r for r in scripted_llm.chat_requests)
    assert "police" in systems[3]  # the mole is the saboteur


async def test_memory_context_reaches_the_prompt(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script(text("First words of the planner."))
    config = mesh.config.with_overrides(session=mesh.config.session.model_copy(update=dict(context_messages=2)))
    result = await run_session(config, RunOptions(turns=5, session_id="heist_memory_check"))
    assert result.session_id == "heist_memory_check"
    fifth = scripted_llm.chat_requests[4]["messages"]
    assert "Turn 1: First words of the planner." in fifth[0]["content"]  # planner's own compressed memory
    conversation = [m["content"] for m in fifth[1:]]
    assert conversation[0].startswith("[briefing]:")
    assert conversation[1:3] == ["[safecracker]: OK.", "[mole]: OK."]  # last 2 conversation messages


async def test_native_tool_calls_feed_results_back(tmp_path: Path, scripted_llm: ScriptedLLM) -> None:
    path = write_heist_config(
        tmp_path,
        llm_base_url=scripted_llm.base_url,
        session={"turn_order": ["safecracker", "planner", "hacker", "mole"]},
    )
    harness = InProcessMesh(load_config(path))
    await harness.start_all()
    try:
        config = harness.with_llm(scripted_llm.base_url, tool_calling="native")
        scripted_llm.script(tool_call("calculator_evaluate", expression="2+3"), text("The answer is 5."))
        result = await run_session(config, RunOptions(turns=1))
    finally:
        await harness.stop_all()
    assert result.turns[0].message == "The answer is 5."
    first, second = scripted_llm.chat_requests[:2]
    names = [t["function"]["name"] for t in first["tools"]]
    assert names == ["calculator_evaluate"]
    assert first["tools"][0]["function"]["parameters"]["required"] == ["expression"]
    tool_message = second["messages"][-1]
    assert tool_message["role"] == "tool" and '"value":5.0' in tool_message["content"]
    assert second["messages"][-2]["tool_calls"][0]["function"]["name"] == "calculator_evaluate"
    row = audit_rows(config, "SELECT tool_name, operation, success, status_code FROM tool_usage")
    assert row == [("calculator", "Evaluate", 1, "OK")]


async def test_auto_mode_uses_native_or_inline(tmp_path: Path, scripted_llm: ScriptedLLM) -> None:
    path = write_heist_config(
        tmp_path,
        llm_base_url=scripted_llm.base_url,
        llm={"base_url": scripted_llm.base_url, "tool_calling": "auto", "timeout_s": 2, "max_retries": 0},
        session={"turn_order": ["safecracker", "planner", "hacker", "mole"]},
    )
    harness = InProcessMesh(load_config(path))
    await harness.start_all()
    try:
        session = await SessionHarness(harness.config).begin()
        scripted_llm.script(
            tool_call("calculator_evaluate", expression="6*7"), text("42 it is."), inline_tool("calculator", "1+1")
        )
        native = await session.turn("safecracker")
        inline = await session.turn("safecracker")
        await session.close()
    finally:
        await harness.stop_all()
    assert native.message == "42 it is." and native.tool_usage[0].success
    assert "1+1 = 2" in inline.message and inline.tool_usage[0].success
    assert "tools" in scripted_llm.chat_requests[0]


async def test_token_is_cached_and_refreshed_before_expiry(tmp_path: Path, scripted_llm: ScriptedLLM) -> None:
    agents = [{"name": "safecracker", "role": "Safecracker", "system_prompt": "Count.", "tools": ["calculator"]}]
    path = write_heist_config(
        tmp_path,
        llm_base_url=scripted_llm.base_url,
        token_ttl_s=1,
        agents=agents,
        session={"turn_order": ["safecracker"]},
    )
    harness = InProcessMesh(load_config(path))
    await harness.start_all()
    try:
        session = await SessionHarness(harness.config).begin()
        scripted_llm.script(*[inline_tool("calculator", f"{n}+1") for n in range(3)])
        await session.turn("safecracker")
        await session.turn("safecracker")  # immediately: cached tokens (the agent's and the memory one)
        assert session.clients.tokens.issued_count == 2
        await asyncio.sleep(0.9)  # past 80% of the 1 s lifetime
        third = await session.turn("safecracker")
        assert session.clients.tokens.issued_count == 4
        assert third.tool_usage[0].success
        await session.close()
    finally:
        await harness.stop_all()


async def test_random_strategy_reproducible_through_runner(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    config = mesh.config.with_overrides(session=mesh.config.session.model_copy(update=dict(strategy="random")))
    orders = []
    for _ in range(2):
        result = await run_session(config, RunOptions(turns=6, seed=11, export=False))
        orders.append([t.agent_name for t in result.turns])
    assert orders[0] == orders[1] and orders[0][0] == "planner"
    assert all(a != b for a, b in zip(orders[0], orders[0][1:], strict=False))


async def test_runner_shares_one_mesh_across_sessions(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    session = SessionHarness(mesh.config)
    try:
        for n in range(2):
            runner = SessionRunner(
                mesh.config,
                session.clients,
                session.llm,
                session.audit,
                RunOptions(turns=2, session_id=f"heist_shared_{n}", export=False),
            )
            assert (await runner.run()).status == "completed"
        assert audit_rows(mesh.config, "SELECT COUNT(*) FROM sessions") == [(2,)]
    finally:
        await session.close()
