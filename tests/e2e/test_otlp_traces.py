"""With OTEL_EXPORTER_OTLP_ENDPOINT set, a heist is one trace per turn across the orchestrator and every service.

Real processes (each service as ``python -m servers.<name>``, ``orchestrator run``
as a subprocess), a scripted LLM, and a real OTLP/HTTP receiver that decodes
what they export with ``opentelemetry-proto``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.access_log import access_entries
from tests.support.otlp import OTLPReceiver
from tests.support.processes import REPO, ProcessMesh
from tests.support.scripted_llm import ScriptedLLM, inline_tool, text

SPAN_KIND_SERVER, SPAN_KIND_CLIENT = 2, 3
TURNS = 4


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as running:
        yield running


def otel_env(receiver: OTLPReceiver) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"}


def test_a_heist_is_one_trace_per_turn_across_the_services(tmp_path: Path, receiver: OTLPReceiver) -> None:
    with ScriptedLLM() as llm:
        llm.script(
            text("Plan: Friday night."),
            inline_tool("file_reader", "bank_layout.md"),
            inline_tool("calculator", "6*7"),
            inline_tool("database_query", "SELECT name FROM guards LIMIT 1"),
        )
        mesh = ProcessMesh(tmp_path, llm_base_url=llm.base_url, env=otel_env(receiver))
        try:
            mesh.start()
            run = subprocess.run(
                [sys.executable, "-m", "orchestrator.cli", "--config", str(mesh.config_path), "run",
                 "--turns", str(TURNS), "--session-id", "heist_otlp_test_1", "--out", str(tmp_path / "out")],
                cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, **otel_env(receiver)},
            )  # fmt: skip
            assert run.returncode == 0, run.stdout + run.stderr
        finally:
            mesh.stop()  # SIGTERM: each server exports what it still holds before it exits
    assert receiver.rejected == []
    # The orchestrator's token histogram went the same way (cumulative: the latest point of each series counts).
    points = [point for point in receiver.points if point.metric == "gen_ai.client.token.usage"]
    assert {(point.service, point.unit) for point in points} == {("heist-orchestrator", "{token}")}
    latest = {tuple(sorted(point.attributes.items())): point for point in points}
    for kind in ("input", "output"):  # the scripted LLM reports 1 token each way per request
        assert sum(p.sum for p in latest.values() if p.attributes["gen_ai.token.type"] == kind) == len(
            llm.chat_requests
        )

    rows = mesh.rows("SELECT turn_id, agent_name, trace_id FROM messages ORDER BY turn_id")
    traces = receiver.traces()
    # Exactly one trace per turn: health probes and start-up checks make no traces of their own.
    assert set(traces) == {trace for _, _, trace in rows}, {t: {s.name for s in spans} for t, spans in traces.items()}
    assert len(traces) == TURNS

    for turn_id, agent, trace_id in rows:
        spans = traces[trace_id]
        by_id = {span.span_id: span for span in spans}
        roots = [span for span in spans if span.is_root]
        assert [(root.service, root.name) for root in roots] == [("heist-orchestrator", f"turn {turn_id} {agent}")]
        root = roots[0]
        assert root.attributes["heist.session_id"] == "heist_otlp_test_1"
        assert (root.attributes["heist.agent"], root.attributes["heist.turn_id"]) == (agent, turn_id)
        for span in spans:
            if span is root:
                continue
            parent = by_id.get(span.parent_span_id)
            assert parent is not None, f"{span.service} {span.name}: parent not in the trace"
            if span.service == "heist-orchestrator":  # RPC and LLM requests: CLIENT spans right under the turn
                assert (span.kind, parent) == (SPAN_KIND_CLIENT, root), span.name
                assert span.attributes["heist.agent"] == agent
            else:  # a server's span is the child of the CLIENT span that called it
                assert span.kind == SPAN_KIND_SERVER, span.name
                assert (parent.service, parent.kind) == ("heist-orchestrator", SPAN_KIND_CLIENT), span.name
                assert parent.name == span.name  # "heist.<x>.v1.<X>Service/Method" on both sides
                assert span.attributes["heist.session_id"] == "heist_otlp_test_1"
                assert span.attributes["heist.agent"] == agent  # from W3C baggage
                assert span.attributes["rpc.grpc.status_code"] == 0
        llm_spans = [s for s in spans if s.attributes.get("gen_ai.operation.name")]
        assert len(llm_spans) == 1 and llm_spans[0].attributes["gen_ai.usage.output_tokens"] == 1

    def services(turn: int) -> set[str]:
        return {span.service for span in traces[rows[turn - 1][2]]}

    assert {"heist-orchestrator", "heist-memory"} <= services(1)  # the planner: memory only, no tool
    assert "heist-calculator" not in services(1)
    assert {"heist-oauth", "heist-file_reader", "heist-memory"} <= services(2)
    assert "heist-calculator" in services(3) and "heist-database_query" in services(4)
    tool_span = next(s for s in traces[rows[2][2]] if s.service == "heist-calculator")
    assert tool_span.attributes["heist.client"] == "safecracker"

    # The access log's trace field and messages.trace_id are still the same IDs.
    logged = access_entries((mesh.log_dir / "calculator.log").read_text())
    assert {entry["trace"] for entry in logged if entry["method"].endswith("/Evaluate")} == {rows[2][2]}


def test_without_the_variables_nothing_is_exported_and_trace_ids_still_flow(
    tmp_path: Path, receiver: OTLPReceiver
) -> None:
    with ScriptedLLM() as llm:
        llm.script(text("Plan."), inline_tool("file_reader", "bank_layout.md"))
        mesh = ProcessMesh(tmp_path, llm_base_url=llm.base_url)
        clean = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
        try:
            mesh.start()
            run = subprocess.run(
                [sys.executable, "-m", "orchestrator.cli", "--config", str(mesh.config_path), "run", "--turns", "2",
                 "--out", str(tmp_path / "out")],
                cwd=REPO, capture_output=True, text=True, timeout=120, env=clean,
            )  # fmt: skip
            assert run.returncode == 0, run.stdout + run.stderr
        finally:
            mesh.stop()
    assert receiver.requests == 0
    (_, trace), = mesh.rows("SELECT turn_id, trace_id FROM messages WHERE turn_id = 2")
    logged = access_entries((mesh.log_dir / "file_reader.log").read_text())
    assert [entry["trace"] for entry in logged if entry["method"].endswith("/ReadFile")] == [trace]

