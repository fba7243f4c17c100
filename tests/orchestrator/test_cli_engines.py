"""The CLI's audit commands on both engines: ``run``, ``sessions``, ``show``, ``export`` with ``--db URL``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from orchestrator.cli import main
from tests.support.audit_db import query
from tests.support.inprocess import InProcessMesh
from tests.support.scripted_llm import ScriptedLLM, inline_tool, text


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def test_run_sessions_show_export_with_db_url(
    mesh: InProcessMesh,
    config_path: Path,
    scripted_llm: ScriptedLLM,
    audit_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    live = mesh.write_config(config_path, tmp_path / "live.yaml")
    scripted_llm.script(text("We go Friday."), inline_tool("file_reader", "bank_layout.md"))
    db = ("--config", str(live), "--db", audit_url)
    out_dir = tmp_path / "logs"
    assert await cli("run", *db, "--turns", "2", "--session-id", "heist_engines", "--out", str(out_dir)) == 0
    printed = capsys.readouterr().out
    assert "Session:    heist_engines (completed)" in printed
    shown_db = audit_url.removeprefix("sqlite:///")
    assert f"Audit DB:   {shown_db}" in printed
    report = json.loads((out_dir / "heist_engines.json").read_text())  # the session's report, read back from the audit
    assert [m["turn_id"] for m in report["messages"]] == [1, 2] and report["tool_usage"][0]["success"] == 1
    assert query(audit_url, "SELECT status, num_turns, turns_planned FROM sessions") == [("completed", 2, 2)]

    assert await cli("sessions", *db) == 0
    assert "heist_engines" in capsys.readouterr().out
    assert await cli("show", "heist_engines", *db) == 0
    assert "Turn 2  hacker (Hacker)" in capsys.readouterr().out
    assert await cli("export", "heist_engines", "--format", "json", *db) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["messages"] == report["messages"] and exported["session"]["status"] == "completed"
    assert await cli("show", "heist_nope", *db) == 5
