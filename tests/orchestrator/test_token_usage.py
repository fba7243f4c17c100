"""LLM tokens: counted per message (reported or estimated), totalled everywhere, metered, and held to a budget."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from heist_common.audit import AuditStore
from heist_common.config import HeistConfig
from heist_common.exit_codes import ExitCode
from heist_common.telemetry import metrics_requested
from orchestrator.cli import _print_summary, main
from orchestrator.llm.client import LLMClient
from orchestrator.llm.usage import Usage, estimate_tokens, read_usage
from orchestrator.mesh.clients import ServiceClients
from orchestrator.output.export import render_markdown
from orchestrator.output.report import render_report
from orchestrator.session.runner import RunOptions, SessionResult, SessionRunner, resume_session, run_session
from tests.support.inprocess import InProcessMesh, audit_rows
from tests.support.otlp import OTLPReceiver
from tests.support.scripted_llm import ScriptedLLM, text

CREW = ("planner", "hacker", "safecracker", "mole")


def with_budget(config: HeistConfig, session: int | None = None, **agents: int) -> HeistConfig:
    """``config`` with ``session.max_llm_tokens`` and some agents' ``max_llm_tokens``."""
    crew = tuple(
        agent.model_copy(update={"max_llm_tokens": agents[agent.name]}) if agent.name in agents else agent
        for agent in config.agents
    )
    return config.with_overrides(session=config.session.model_copy(update={"max_llm_tokens": session}), agents=crew)


async def run_metered(
    config: HeistConfig, options: RunOptions
) -> tuple[SessionResult, LLMClient, InMemoryMetricReader]:
    """One session whose LLM client meters into an in-memory OpenTelemetry reader."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    audit = AuditStore.open(config.database.url)
    clients = ServiceClients(config)
    llm = LLMClient(config.llm, meter=provider.get_meter("test"))
    try:
        result = await SessionRunner(config, clients, llm, audit, options).run()
    finally:
        await clients.close()
        await llm.close()
        audit.close()
    return result, llm, reader


def token_points(reader: InMemoryMetricReader) -> list[HistogramDataPoint]:
    data = reader.get_metrics_data()
    assert data is not None
    return [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "gen_ai.client.token.usage"
        for point in metric.data.data_points
        if isinstance(point, HistogramDataPoint)
    ]


def test_usage_is_read_from_the_reply_or_estimated_and_marked() -> None:
    assert read_usage({"usage": {"prompt_tokens": 12, "completion_tokens": 3}}, 999, 999) == Usage(12, 3)
    assert read_usage({"choices": []}, 9, 4) == Usage(3, 1, estimated=True)
    # A count that is not a count is not believed.
    assert read_usage({"usage": {"prompt_tokens": -1, "completion_tokens": 3}}, 8, 0) == Usage(2, 0, estimated=True)
    assert read_usage({"usage": {"prompt_tokens": True, "completion_tokens": 3}}, 0, 0).estimated
    assert [estimate_tokens(n) for n in (0, 1, 4, 5)] == [0, 1, 1, 2]


async def test_each_turn_stores_its_requests_tokens_summed_and_totals_agree_everywhere(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM, config_path: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    scripted_llm.script(
        text("", usage=(30, 0)),  # the planner's empty reply, resampled: both requests count
        text("Plan.", usage=(31, 5)),
        text("Hack.", usage=(40, 7)),
        text("Numbers.", usage=None),  # this server says nothing: estimated
        text("Mole.", usage=(50, 9)),
    )
    config = mesh.config
    result, llm, reader = await run_metered(config, RunOptions(session_id="heist_tokens", export_dir=tmp_path / "out"))
    assert result.status == "completed", result.error

    estimated_request = scripted_llm.chat_requests[3]
    sent = json.dumps(estimated_request["messages"], ensure_ascii=False, separators=(",", ":"))
    estimated_prompt = math.ceil(len(sent) / 4)
    rows = audit_rows(
        config,
        "SELECT agent_name, prompt_tokens, completion_tokens, tokens_estimated FROM messages ORDER BY turn_id",
    )
    assert rows == [
        ("planner", 61, 5, 0),
        ("hacker", 40, 7, 0),
        ("safecracker", estimated_prompt, 2, 1),
        ("mole", 50, 9, 0),
    ]
    prompt, completion = 61 + 40 + estimated_prompt + 50, 5 + 7 + 2 + 9
    totals = result.tokens
    assert (totals.session.prompt, totals.session.completion, totals.session.estimated) == (prompt, completion, True)
    assert totals.agent("planner").total == 66 and not totals.agent("planner").estimated
    assert totals.agent("safecracker").estimated

    # Prometheus: per agent, model and kind; no session label.
    registry = llm.tokens.registry
    model = config.llm.model

    def sample(agent: str, kind: str) -> float | None:
        return registry.get_sample_value("heist_llm_tokens_total", {"agent": agent, "model": model, "kind": kind})

    assert [sample(agent, "input") for agent in CREW] == [61, 40, estimated_prompt, 50]
    assert [sample(agent, "output") for agent in CREW] == [5, 7, 2, 9]
    assert all("session" not in s.labels for m in registry.collect() for s in m.samples)

    # OpenTelemetry: one histogram record per request and token type.
    points = token_points(reader)
    by_type = {p.attributes["gen_ai.token.type"]: p for p in points if "heist.tokens_estimated" not in p.attributes}
    assert by_type["input"].sum == 61 + 40 + 50 and by_type["input"].count == 4
    assert by_type["output"].sum == 5 + 7 + 9
    assert by_type["input"].attributes["gen_ai.request.model"] == model
    assert by_type["input"].attributes["gen_ai.operation.name"] == "chat"
    estimated = [p for p in points if p.attributes.get("heist.tokens_estimated")]
    assert sorted((p.attributes["gen_ai.token.type"], p.sum) for p in estimated) == [
        ("input", estimated_prompt), ("output", 2)
    ]  # fmt: skip

    # The end-of-run summary, sessions, show and the report say the same as the audit.
    _print_summary(result)
    summary = capsys.readouterr().out
    described = f"~{prompt + completion} (~{prompt} prompt + ~{completion} completion)"
    assert f"LLM tokens: {described}" in summary
    assert f"by agent: planner 66, hacker 47, safecracker ~{estimated_prompt + 2}, mole 59" in summary

    live = mesh.write_config(config_path, tmp_path / "live.yaml")
    assert await asyncio.to_thread(main, ["sessions", "--config", str(live)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:4] == ["session", "status", "turns", "tokens"]
    assert listing[1].split()[:4] == ["heist_tokens", "completed", "4", f"~{prompt + completion}"]

    assert await asyncio.to_thread(main, ["export", "heist_tokens", "--format", "md", "--config", str(live)]) == 0
    shown = capsys.readouterr().out
    assert f"- LLM tokens: {described.replace('~', chr(92) + '~')}" in shown  # Markdown: each "~" escaped
    assert f"- tokens: {estimated_prompt} prompt + 2 completion (estimated)" in shown
    assert "- tokens: 61 prompt + 5 completion\n" in shown
    assert await asyncio.to_thread(main, ["show", "heist_tokens", "--config", str(live)]) == 0
    shown = capsys.readouterr().out  # the terminal view says the same
    assert any(line.startswith("LLM tokens") and line.endswith(described) for line in shown.splitlines())
    assert f"  tokens: {estimated_prompt} prompt + 2 completion (estimated)\n" in shown
    assert "  tokens: 61 prompt + 5 completion\n" in shown

    report = (tmp_path / "out" / "heist_tokens.html").read_text()
    assert f'<div class="card">LLM tokens<b>~{prompt + completion}</b></div>' in report
    assert (
        '<tr><td>planner</td><td class="num">1</td><td class="num">61</td><td class="num">5</td>'
        '<td class="num">66</td><td>reported</td></tr>'
    ) in report
    assert f'<td class="num">{prompt + completion}</td><td>estimated in part</td></tr>' in report


async def test_the_turn_that_crosses_the_session_budget_is_recorded_then_the_session_fails(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM, config_path: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    scripted_llm.default = text("Onwards.", usage=(30, 10))
    live = mesh.write_config(config_path, tmp_path / "live.yaml")
    text_config = live.read_text().replace("max_turns: 4", "max_turns: 8\n  max_llm_tokens: 100")
    live.write_text(text_config)

    code = await asyncio.to_thread(main, ["run", "--config", str(live), "--session-id", "heist_budget"])
    captured = capsys.readouterr()
    assert code == ExitCode.FAILED == 1
    assert "Session:    heist_budget (failed)" in captured.out
    assert "LLM tokens: 120 (90 prompt + 30 completion)" in captured.out
    reason = (
        "budget: the session used 120 (90 prompt + 30 completion) LLM tokens after turn 3 (safecracker), "
        "over session.max_llm_tokens = 100"
    )
    assert f"Error:      {reason}" in captured.err
    config = mesh.config
    assert audit_rows(config, "SELECT status, num_turns, error FROM sessions") == [("failed", 3, reason)]
    assert audit_rows(config, "SELECT turn_id, prompt_tokens, completion_tokens FROM messages") == [
        (1, 30, 10), (2, 30, 10), (3, 30, 10)
    ]  # fmt: skip
    assert audit_rows(
        config, "SELECT turn_id, agent_name, status_code, detail FROM events WHERE operation = 'budget'"
    ) == [(3, "safecracker", "BUDGET_EXCEEDED", reason)]


async def test_an_agents_own_budget_ends_the_session_at_its_turn(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.default = text("Onwards.", usage=(30, 10))
    config = with_budget(mesh.config, hacker=70)  # the hacker speaks at turns 2 and 6: 80 tokens at turn 6
    result = await run_session(config, RunOptions(turns=8, export=False))
    assert (result.status, result.exit_code) == ("failed", ExitCode.FAILED)
    assert result.error == (
        "budget: hacker used 80 (60 prompt + 20 completion) LLM tokens after turn 6 (hacker), "
        "over its max_llm_tokens = 70"
    )
    assert [turn.turn_id for turn in result.turns] == [1, 2, 3, 4, 5, 6]
    assert audit_rows(config, "SELECT COUNT(*) FROM messages") == [(6,)]


async def test_a_resumed_session_counts_on_from_the_audits_totals(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.default = text("Onwards.", usage=(30, 10))
    config = mesh.config.with_overrides(session=mesh.config.session.model_copy(update={"max_turns": 12}))
    first = await run_session(with_budget(config, session=100), RunOptions(session_id="heist_resumed", export=False))
    assert first.status == "failed" and first.error is not None and first.error.startswith("budget:")
    assert len(first.turns) == 3

    # A raised budget lets it go on, counting from the audited 120 tokens: 120 + 4 * 40 = 280 crosses 250 at turn 7.
    result = await resume_session(with_budget(config, session=250), "heist_resumed")
    assert result.status == "failed" and [t.turn_id for t in result.turns] == [4, 5, 6, 7]
    assert result.tokens.session.total == 280 and result.tokens.agent("safecracker").total == 2 * 40
    assert result.error is not None and "used 280 (210 prompt + 70 completion) LLM tokens after turn 7" in str(
        result.error
    )

    # Still over it: a resume stops before playing a turn.
    again = await resume_session(with_budget(config, session=250), "heist_resumed")
    assert again.status == "failed" and again.turns == [] and again.exit_code == ExitCode.FAILED
    assert again.error == (
        "budget: the session used 280 (210 prompt + 70 completion) LLM tokens, over session.max_llm_tokens = 250"
    )
    assert audit_rows(config, "SELECT COUNT(*), SUM(prompt_tokens + completion_tokens) FROM messages") == [(7, 280)]


def test_metric_export_follows_the_standard_variables() -> None:
    assert not metrics_requested({})
    assert metrics_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert metrics_requested({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://127.0.0.1:4318/v1/metrics"})
    assert not metrics_requested({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"})
    assert not metrics_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_METRICS_EXPORTER": "none"})


def test_logs_written_before_tokens_were_counted_render_without_them() -> None:
    log: dict[str, Any] = {
        "session": {"session_id": "heist_old", "status": "completed", "start_time": "t", "num_turns": 1},
        "messages": [
            {
                "turn_id": 1,
                "agent_name": "planner",
                "agent_role": "r",
                "message": "hi",
                "status": "ok",
                "latency_ms": 1.0,
                "timestamp": "t",
                "timings": None,
                "prompt_tokens": None,
                "completion_tokens": None,
            },
        ],
        "tool_usage": [],
        "events": [],
    }
    assert "tokens" not in render_markdown(log)
    assert "LLM tokens" not in render_report(log)


async def test_a_transcript_turns_resample_counts_too_and_one_unreported_request_marks_the_turn(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script(
        text("We go in on Friday.", usage=(20, 6)),
        text("We go in on Friday.", usage=(25, 6)),  # the hacker parrots the planner: resampled hotter
        text("The vault opens at 07:30.", usage=None),
    )
    llm = mesh.config.llm.model_copy(update={"prompt_style": "transcript", "prefill_tool_every": 0})
    result = await run_session(mesh.config.with_overrides(llm=llm), RunOptions(turns=2, export=False))
    assert result.status == "completed" and result.turns[1].message == "The vault opens at 07:30."
    resample_prompt = scripted_llm.text_requests[2]["prompt"]
    prompt = 25 + math.ceil(len(resample_prompt) / 4)
    completion = 6 + math.ceil(len("The vault opens at 07:30.") / 4)
    rows = audit_rows(mesh.config, "SELECT prompt_tokens, completion_tokens, tokens_estimated FROM messages")
    assert rows == [(20, 6, 0), (prompt, completion, 1)]
    assert result.turns[1].llm_requests == 2


async def test_the_histogram_is_exported_over_otlp_when_the_standard_variables_ask(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted_llm.default = text("Onwards.", usage=(30, 10))
    with OTLPReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        result = await run_session(mesh.config, RunOptions(turns=4, export=False))  # exports at its end
        points = [point for point in receiver.points if point.metric == "gen_ai.client.token.usage"]
    assert result.status == "completed" and receiver.rejected == []
    latest = {tuple(sorted(point.attributes.items())): point for point in points}
    inputs = [point for point in latest.values() if point.attributes["gen_ai.token.type"] == "input"]
    assert sum(point.sum for point in inputs) == 4 * 30 and sum(point.count for point in inputs) == 4
    assert {point.service for point in points} == {"heist-orchestrator"}
    assert inputs[0].attributes["gen_ai.request.model"] == mesh.config.llm.model
