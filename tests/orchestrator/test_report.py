"""``orchestrator report``: one self-contained HTML page, checked in a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from heist_common.exit_codes import ExitCode
from orchestrator.cli import main
from orchestrator.output.report import render_report, service_summary
from orchestrator.session.runner import RunOptions, run_session
from tests.support.browser import Chromium
from tests.support.inprocess import InProcessMesh
from tests.support.scripted_llm import ScriptedLLM, http_error, inline_tool, text

PAGE_FACTS = """JSON.stringify({
  title: document.title,
  charts: [...document.querySelectorAll('svg.waterfall-chart')].map(svg => {
    const box = svg.getBoundingClientRect();
    const bars = [...svg.querySelectorAll('rect')].map(r => r.getBoundingClientRect().width);
    return {width: box.width, height: box.height, bars: bars.length, drawn: bars.filter(w => w > 0).length};
  }),
  turns: document.querySelectorAll('.turn').length,
  health: document.querySelectorAll('table.health tbody tr').length,
  services: [...document.querySelectorAll('table.services tbody tr td:first-child')].map(td => td.textContent),
  scripts: document.scripts.length,
  external: [...document.querySelectorAll('[src],[href]')].map(e => e.getAttribute('src') || e.getAttribute('href'))
    .filter(u => !u.startsWith('#')),
})"""


@pytest.fixture
async def session_id(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> str:
    scripted_llm.script(
        text("Plan: Friday night, <b>quietly</b>.", delay_s=0.03),
        inline_tool("file_reader", "bank_layout.md"),
        inline_tool("calculator", "(120 - 15) * 3 / 7"),
        inline_tool("database_query", "SELECT nope FROM guards"),  # a failed tool call
        http_error(500, "model overloaded"),  # an LLM error turn
        inline_tool("file_reader", "no_such_file.md"),
        text("Vault at 02:10."),
        text("<script>alert('x')</script> I'm in."),  # model text is escaped, never run
    )
    result = await run_session(mesh.config, RunOptions(turns=8, export=False))
    assert result.status == "completed"
    return result.session_id


def report(config_path: Path, session_id: str, out: Path) -> Path:
    assert main(["--config", str(config_path), "report", session_id, "--out", str(out)]) == 0
    return out


async def test_the_report_renders_in_headless_chromium(
    mesh: InProcessMesh, session_id: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = mesh.write_config(tmp_path / "heist.yaml", tmp_path / "served.yaml")
    page = report(config_path, session_id, tmp_path / "report.html")
    assert f"wrote {page}" in capsys.readouterr().out
    html = page.read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert" in html

    with Chromium(tmp_path / "chromium") as browser:
        loaded = browser.check(page.as_uri(), PAGE_FACTS)
        # The checks above would see a page that reaches for the network: the same page with one external
        # style sheet (blocked by its own Content-Security-Policy, so nothing is fetched) is an error.
        tampered = tmp_path / "tampered.html"
        tampered.write_text(html.replace("</head>", '<link rel="stylesheet" href="https://cdn.invalid/x.css"></head>'))
        refused = browser.check(tampered.as_uri(), "1")
    assert loaded.errors == [], loaded.errors
    assert refused.errors and "Content Security Policy" in refused.errors[0]

    facts = json.loads(loaded.evaluated)
    assert facts["title"] == f"Heist session {session_id}"
    assert facts["scripts"] == 0 and facts["external"] == []
    assert len(facts["charts"]) == 8, "one waterfall per turn"
    for chart in facts["charts"]:
        assert chart["width"] > 500 and chart["height"] > 40
        assert chart["bars"] >= 3 and chart["drawn"] == chart["bars"], chart  # memory, LLM, audit write at least
    assert facts["turns"] == 8
    assert facts["health"] == len(mesh.config.crew_services) + 1  # every service a session calls, and the LLM
    assert {"llm", "audit", "memory", "oauth"} <= set(facts["services"])

    assert loaded.screenshot.startswith(b"\x89PNG\r\n\x1a\n") and len(loaded.screenshot) > 20_000
    shot = tmp_path / "report.png"
    shot.write_bytes(loaded.screenshot)
    if os.environ.get("HEIST_REPORT_SCREENSHOT"):  # to look at it (docs/report.png comes from here)
        shutil.copy(shot, os.environ["HEIST_REPORT_SCREENSHOT"])


async def test_a_run_writes_the_report_beside_its_logs(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script(text("Plan."), inline_tool("file_reader", "bank_layout.md"))
    result = await run_session(mesh.config, RunOptions(turns=2))
    assert result.report is not None and result.report.exists()
    assert result.report == result.exports[0].with_suffix(".html")
    assert 'class="waterfall-chart"' in result.report.read_text()


def test_an_unknown_session_is_exit_5(config_path: Path, session_id: str) -> None:
    assert main(["--config", str(config_path), "report", "heist_nobody"]) == ExitCode.UNKNOWN_SESSION


def old_log() -> dict[str, object]:
    """A session written before timings existed: no ``timings``, a tool row with its latency."""
    return {
        "session": {"session_id": "heist_old", "status": "completed", "start_time": "2026-01-01T00:00:00",
                    "end_time": None, "num_turns": 1, "strategy": None, "seed": None, "model": "m", "error": None},
        "messages": [{"turn_id": 1, "agent_name": "mole", "agent_role": "Inside Man", "message": "hi & bye",
                      "timestamp": "t", "status": "ok", "latency_ms": 12.5, "trace_id": None, "timings": None}],
        "tool_usage": [{"turn_id": 1, "tool_name": "database_query", "operation": "Query", "tool_params": "{}",
                        "tool_result": "r", "success": 0, "status_code": "INVALID_ARGUMENT", "latency_ms": 3.0}],
        "events": [],
    }  # fmt: skip


def test_a_session_from_before_timings_still_renders() -> None:
    html = render_report(old_log())
    assert "No timings recorded for this turn" in html and "hi &amp; bye" in html
    assert service_summary(old_log()) == [
        {"service": "database_query", "calls": 1, "errors": 1, "p50_ms": 3.0, "p95_ms": 3.0, "max_ms": 3.0}
    ]


def test_a_damaged_timings_value_is_shown_as_missing_not_a_crash() -> None:
    log = old_log()
    damaged = '{"steps": [["evil", "x", 0, 1, "OK"], ["llm", "y", "x", 1, "OK"], 7], "total_ms": NaN}'
    log["messages"][0]["timings"] = damaged  # type: ignore[index]
    html = render_report(log)
    assert "evil" not in html and 'class="waterfall-chart"' in html
