"""Each turn's timeline in ``messages.timings``: LLM, token, tool RPC, memory and audit write, from real calls."""

from __future__ import annotations

import json

from orchestrator.session.runner import RunOptions, run_session
from tests.support.inprocess import InProcessMesh, audit_rows
from tests.support.scripted_llm import ScriptedLLM, inline_tool, text


async def test_every_turn_stores_where_its_time_went(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script(
        text("Plan: Friday night.", delay_s=0.05),
        inline_tool("file_reader", "bank_layout.md"),
        inline_tool("calculator", "6*7"),
        inline_tool("database_query", "SELECT nope FROM guards"),  # fails: its step says so
        text("Again."),
        text("Still."),
    )
    result = await run_session(mesh.config, RunOptions(turns=6))
    rows = audit_rows(
        mesh.config,
        "SELECT turn_id, agent_name, latency_ms, timings FROM messages WHERE session_id = ? ORDER BY turn_id",
        result.session_id,
    )
    assert len(rows) == 6
    def parsed(raw: str) -> dict:
        timeline = json.loads(raw)
        assert timeline["fields"] == ["kind", "name", "start_ms", "ms", "code"]
        timeline["steps"] = [dict(zip(timeline["fields"], step, strict=True)) for step in timeline["steps"]]
        return timeline

    timelines = {turn: (agent, latency, parsed(timings)) for turn, agent, latency, timings in rows}

    for turn, (agent, latency, timeline) in timelines.items():
        assert timeline["v"] == 1
        steps = timeline["steps"]
        kinds = [step["kind"] for step in steps]
        assert kinds.count("llm") == 1, (turn, kinds)
        assert kinds.count("audit") == 1, "the audit write is in the final timeline"
        assert any(step["name"] == "memory.StoreMemory" for step in steps), turn
        assert [step["start_ms"] for step in steps] == sorted(step["start_ms"] for step in steps)
        for step in steps:
            assert step["start_ms"] >= 0 and step["ms"] >= 0
            # Steps and the total are each rounded to microseconds and measured by different clocks' reads
            # (the audit write on its writer thread): allow 0.5 ms of slack, far below any step's size.
            assert step["start_ms"] + step["ms"] <= timeline["total_ms"] + 0.5, (turn, step)
        assert timeline["total_ms"] >= latency, "the final timeline includes the write that latency_ms precedes"
        if agent == "planner":
            assert "tool" not in kinds
    # Turn 1 fetched the orchestrator's own memory token; by turn 5 it is cached, and the planner has no tools.
    assert "token" in [s["kind"] for s in timelines[1][2]["steps"]]
    assert "token" not in [s["kind"] for s in timelines[5][2]["steps"]]
    # The hacker's second turn got its token from the cache: a step of (almost) no time, not an RPC.
    cached = [s for s in timelines[6][2]["steps"] if s["kind"] == "token"]
    assert [s["name"] for s in cached] == ["token (cached)"] and cached[0]["ms"] < 5

    planner_llm = next(s for s in timelines[1][2]["steps"] if s["kind"] == "llm")
    assert planner_llm["name"] == "chat.completions" and planner_llm["ms"] >= 50  # the scripted delay
    first_tool_turn = timelines[2][2]["steps"]
    # The listing its argument's grammar is built from (llm.constrained_tools: auto) is a step too, once per 30 s.
    tool_steps = [s["name"] for s in first_tool_turn if s["kind"] == "tool"]
    assert tool_steps == ["file_reader.ListFiles", "file_reader.ReadFile"]
    assert any(s["name"] == "oauth.IssueToken" and s["kind"] == "token" for s in first_tool_turn)
    failed = [s for s in timelines[4][2]["steps"] if s["kind"] == "tool"]
    assert [(s["name"], s["code"]) for s in failed] == [
        ("database_query.ListTables", "OK"),
        ("database_query.Query", "INVALID_ARGUMENT"),
    ]
    # The memory service is prefetched for the next speaker during a turn: that call is this turn's step.
    assert any(s["name"] == "memory.GetCompressedMemory" for s in timelines[1][2]["steps"])
