"""What the CLI prints: the live line on a terminal, ``--json`` lines true to the audit, ``show``, tables, errors."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cli import main
from orchestrator.session.records import SHAPES
from tests.support.inprocess import InProcessMesh, audit_rows
from tests.support.scripted_llm import Reply, ScriptedLLM, text, tool_call

REPO = Path(__file__).resolve().parents[2]
ORCHESTRATOR = str(Path(sys.executable).parent / "orchestrator")
SLOW_S = 0.8
"""Each scripted reply's delay: long enough for several redraws of the live line (every 0.2 s)."""


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


@pytest.fixture
def live_config(mesh: InProcessMesh, config_path: Path, tmp_path: Path) -> Path:
    return mesh.write_config(config_path, tmp_path / "live.yaml")


def read_pty_run(command: list[str], columns: int = 160, term: str = "xterm") -> tuple[int, str, str]:
    """Run ``command`` with its stdout on a pseudo-terminal; return its exit code, what the terminal got, stderr."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen(
        command, stdout=slave, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env={**os.environ, "TERM": term}
    )
    os.close(slave)
    received = bytearray()
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            received += chunk
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    proc.stderr.close()
    return proc.returncode, received.decode(errors="replace"), err


LIVE = re.compile(r"\r\x1b\[K(\[turn (\d+)\] (\w+) \(([^)]*)\) (\d+\.\d)s ([^\r\n]*?) \.\.\.)")
"""A live line as drawn: erase, then ``[turn N] agent (role) 1.2s what ...``."""


async def test_run_on_a_terminal_shows_each_turn_live_and_replaces_it_by_the_turn(
    live_config: Path, scripted_llm: ScriptedLLM, tmp_path: Path
) -> None:
    scripted_llm.script(
        Reply(content="We go Friday.", delay_s=SLOW_S),
        Reply(content="Let me check. [TOOL:file_reader:bank_layout.md]", delay_s=SLOW_S),
    )
    command = [ORCHESTRATOR, "run", "--config", str(live_config), "--turns", "2", "--session-id", "heist_live"]
    code, screen, err = await asyncio.to_thread(read_pty_run, [*command, "--out", str(tmp_path / "logs")])
    assert code == 0, err
    drawn = LIVE.findall(screen)
    assert drawn, screen[-2000:]
    phases: dict[int, list[str]] = {}
    for _line, turn, _agent, _role, _elapsed, doing in drawn:
        seen = phases.setdefault(int(turn), [])
        if not seen or seen[-1] != doing:
            seen.append(doing)
    assert phases[1] == ["recalling memory", "thinking", "writing to the audit"]
    assert phases[2] == ["recalling memory", "thinking", "calling file_reader.ReadFile", "writing to the audit"]
    assert {(agent, role) for _l, turn, agent, role, _e, _d in drawn} == {
        ("planner", "Mastermind"),
        ("hacker", "Hacker"),
    }
    # Redrawn in place while the model thinks: the same line again, its time moving on.
    thinking = [float(elapsed) for _l, turn, _a, _r, elapsed, doing in drawn if turn == "1" and doing == "thinking"]
    assert len(thinking) >= 2 and thinking == sorted(thinking) and thinking[-1] > thinking[0]
    # Each turn's own line replaces the live line (erased first), and nothing is left drawn at the end.
    assert "\r\x1b[K[turn 1] planner (Mastermind): We go Friday." in screen
    assert "\r\x1b[K[turn 2] hacker (Hacker): Let me check." in screen
    after_last_turn = screen[screen.index("[turn 2] hacker (Hacker): Let me check.") :]
    assert "\x1b[K[turn" not in after_last_turn and "Session:    heist_live (completed)" in after_last_turn


async def test_run_into_a_pipe_prints_no_live_line(live_config: Path, scripted_llm: ScriptedLLM) -> None:
    scripted_llm.default = text("Steady.", delay_s=0.3)
    command = [ORCHESTRATOR, "run", "--config", str(live_config), "--turns", "2", "--session-id", "heist_piped"]
    done = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=120, env={**os.environ, "TERM": "xterm"}
    )
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "\r" not in done.stdout
    assert "[turn 2] hacker (Hacker): Steady." in done.stdout


async def test_run_on_a_dumb_terminal_prints_no_live_line(live_config: Path, scripted_llm: ScriptedLLM) -> None:
    scripted_llm.default = text("Steady.", delay_s=0.3)
    command = [ORCHESTRATOR, "run", "--config", str(live_config), "--turns", "1", "--session-id", "heist_dumb"]
    code, screen, err = await asyncio.to_thread(read_pty_run, command, term="dumb")
    assert code == 0, err
    assert "\x1b" not in screen and "[turn 1] planner (Mastermind): Steady." in screen


def check_shape(kind: str, record: dict[str, Any]) -> None:
    assert list(record) == list(SHAPES[kind]), f"{kind}: {list(record)}"


async def test_run_json_prints_one_object_per_turn_then_the_summary_true_to_the_audit(
    live_config: Path, mesh: InProcessMesh, scripted_llm: ScriptedLLM, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted_llm.script(text('Plan: "*bold*" <b>'), text("Let me check. [TOOL:file_reader:bank_layout.md]"))
    code = await cli("run", "--config", str(live_config), "--turns", "3", "--json")
    out = capsys.readouterr().out
    assert code == 0, out
    records = [json.loads(line) for line in out.splitlines()]  # every line is JSON, nothing else
    assert [record["type"] for record in records] == ["turn", "turn", "turn", "summary"]
    turns, summary = records[:3], records[3]
    for record in turns:
        check_shape("turn", record)
    check_shape("summary", summary)
    session_id = summary["session_id"]
    assert {record["session_id"] for record in turns} == {session_id}
    audited = audit_rows(
        mesh.config,
        "SELECT turn_id, agent_name, agent_role, status, message, trace_id FROM messages WHERE session_id = ? "
        "ORDER BY turn_id",
        session_id,
    )
    assert [(r["turn_id"], r["agent"], r["role"], r["status"], r["message"], r["trace_id"]) for r in turns] == audited
    assert turns[0]["message"] == 'Plan: "*bold*" <b>'  # as said: no escaping but JSON's
    tools = audit_rows(
        mesh.config,
        "SELECT turn_id, tool_name, operation, tool_params, tool_result, success, status_code FROM tool_usage "
        "WHERE session_id = ?",
        session_id,
    )
    assert [
        (r["turn_id"], c["tool"], c["operation"], c["params"], c["result"], int(c["success"]), c["status_code"])
        for r in turns
        for c in r["tool_calls"]
    ] == tools
    assert tools and tools[0][1] == "file_reader"
    (status, num_turns), *_ = audit_rows(
        mesh.config, "SELECT status, num_turns FROM sessions WHERE session_id = ?", session_id
    )
    assert (summary["status"], summary["turns"], summary["exit_code"]) == (status, num_turns, 0) == ("completed", 3, 0)
    assert summary["tool_calls_ok"] == 1 and summary["tool_calls_failed"] == 0 and summary["errors"] == 0
    assert {health["service"] for health in summary["health"]} == {*mesh.config.services, "llm"}
    for health in summary["health"]:
        check_shape("health", health)
        assert health["ok"] is True and health["status"] == "SERVING"
    assert summary["report"] and summary["report"].endswith(f"{session_id}.html") and len(summary["logs"]) == 2


async def test_sessions_show_and_health_json(
    live_config: Path, mesh: InProcessMesh, scripted_llm: ScriptedLLM, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted_llm.default = text("Noted.")
    for session_id in ("heist_json_1", "heist_json_2"):
        assert await cli("run", "--config", str(live_config), "--turns", "2", "--session-id", session_id) == 0
    capsys.readouterr()

    assert await cli("sessions", "--config", str(live_config), "--json") == 0
    sessions = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for record in sessions:
        check_shape("session", record)
    audited = audit_rows(mesh.config, "SELECT session_id, status, num_turns, start_time, end_time FROM sessions")
    assert sorted((s["session_id"], s["status"], s["num_turns"], s["start_time"], s["end_time"]) for s in sessions) == (
        sorted(audited)
    )
    assert {s["turns_planned"] for s in sessions} == {2}
    assert all(isinstance(s["tokens"], int) and s["tokens"] > 0 for s in sessions)

    assert await cli("show", "heist_json_2", "--config", str(live_config), "--json") == 0
    (line,) = capsys.readouterr().out.splitlines()
    log = json.loads(line)
    assert log["session"]["session_id"] == "heist_json_2"
    assert [m["message"] for m in log["messages"]] == ["Noted.", "Noted."]
    assert await cli("export", "heist_json_2", "--config", str(live_config)) == 0
    assert json.loads(capsys.readouterr().out) == log  # the same log as export's JSON, on one line

    assert await cli("health", "--config", str(live_config), "--json") == 0
    health = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for record in health:
        check_shape("health", record)
    assert [h["service"] for h in health] == [*mesh.config.services, "llm"]
    await mesh.stop("memory")
    assert await cli("health", "--config", str(live_config), "--json") == 6
    down = {h["service"]: h for h in map(json.loads, capsys.readouterr().out.splitlines())}
    assert down["memory"]["ok"] is False and down["memory"]["status"] == "UNREACHABLE" and down["memory"]["detail"]


async def test_show_is_a_terminal_view_and_export_md_the_markdown_file(
    live_config: Path, scripted_llm: ScriptedLLM, capsys: pytest.CaptureFixture[str]
) -> None:
    said = "Use the *side* door_ at 3 <am> # sharp, " + "then wait by the vault " * 12
    scripted_llm.script(text(said), text("Let me check. [TOOL:file_reader:bank_layout.md]"))
    assert await cli("run", "--config", str(live_config), "--turns", "2", "--session-id", "heist_view") == 0
    capsys.readouterr()
    assert await cli("show", "heist_view", "--config", str(live_config)) == 0
    shown = capsys.readouterr().out
    assert await cli("export", "heist_view", "--format", "md", "--config", str(live_config)) == 0
    markdown = capsys.readouterr().out
    assert shown != markdown
    assert markdown.startswith("# Heist session heist_view") and "\\*side\\*" in markdown and "&lt;am&gt;" in markdown
    assert "Turn 1  planner (Mastermind)" in shown and "Turn 2  hacker (Hacker)" in shown
    words = " ".join(line.strip() for line in shown.splitlines() if line.startswith("  ") and "vault" in line)
    assert said.strip() in words  # the words as said, wrapped over several lines
    assert all(len(line) <= 100 for line in shown.splitlines() if "vault" in line)
    assert "\\" not in shown and "&lt;" not in shown and "###" not in shown
    assert "tool file_reader.ReadFile" in shown


def columns_of(line: str, header: str) -> list[int]:
    return [match.start() for match in re.finditer(r"\S+", header)][: len(line.split())]


async def test_sessions_and_health_tables_are_aligned(
    live_config: Path, scripted_llm: ScriptedLLM, capsys: pytest.CaptureFixture[str]
) -> None:
    for session_id in ("heist_a", "heist_with_a_much_longer_name"):
        assert await cli("run", "--config", str(live_config), "--turns", "1", "--session-id", session_id) == 0
    capsys.readouterr()
    assert await cli("sessions", "--config", str(live_config)) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["session", "status", "turns", "tokens", "start", "end"] and len(rows) == 2
    status_at, start_at = header.index("status"), header.index("start")
    for row in rows:
        assert row[status_at:].startswith("completed") and row[start_at : start_at + 4].isdigit()
    assert await cli("health", "--config", str(live_config)) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    status_at = header.index("status")
    assert rows and all(row[status_at:].startswith("SERVING") for row in rows)


def test_version_is_the_installed_package_version() -> None:
    done = subprocess.run([ORCHESTRATOR, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == f"orchestrator {version('heist-mesh')}\n"


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["run", "--turns", "many"], "argument --turns: invalid int value: 'many'"),
        (["run", "--bogus"], "unrecognized arguments: --bogus"),
        (["show"], "the following arguments are required: SESSION"),
        (["launch"], "invalid choice: 'launch'"),
        (["sessions", "--json=yes"], "ignored explicit argument 'yes'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv: list[str], says: str) -> None:
    done = subprocess.run([ORCHESTRATOR, *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stdout == "" and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("orchestrator") and says in done.stderr and "--help'" in done.stderr


async def test_progress_observer_sees_every_phase_of_native_tool_rounds_in_order(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM
) -> None:
    from orchestrator.session.runner import RunOptions, run_session
    from orchestrator.turn.progress import Phase, PhaseChange

    scripted_llm.script(text("Plan."), tool_call("file_reader_read_file", filename="bank_layout.md"), text("Read it."))
    config = mesh.with_llm(scripted_llm.base_url, tool_calling="native", constrained_tools="off")
    changes: list[PhaseChange] = []
    ended: list[int] = []
    result = await run_session(
        config, RunOptions(turns=2, export=False), on_progress=changes.append, on_turn=lambda t: ended.append(t.turn_id)
    )
    assert result.status == "completed", result.error
    by_turn = [[(c.phase, c.detail) for c in changes if c.turn_id == n] for n in (1, 2)]
    assert by_turn[0] == [(Phase.MEMORY, ""), (Phase.THINKING, ""), (Phase.WRITING, "")]
    assert by_turn[1] == [
        (Phase.MEMORY, ""),
        (Phase.THINKING, ""),
        (Phase.TOOL, "file_reader.ReadFile"),
        (Phase.THINKING, ""),  # the model reads the result
        (Phase.WRITING, ""),
    ]
    assert {(c.session_id, c.agent, c.role) for c in changes if c.turn_id == 2} == {
        (result.session_id, "hacker", "Hacker")
    }
    assert len({c.started for c in changes if c.turn_id == 2}) == 1 and ended == [1, 2]
