"""End to end on the real embedded model: `make serve` (LLM on), `orchestrator run`, then the audit.

The one test that needs the llama.cpp server and Gemma 3 270M; it asserts what a
newcomer's `make run` leaves behind, not what the model says.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from heist_common.layout import REPO_ROOT
from tests.e2e.harness import Mesh, make
from tests.support.access_log import access_entries
from tests.support.ports import listening

pytestmark = pytest.mark.llm
TURNS = 4


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    mesh = Mesh(tmp_path_factory.mktemp("embedded"))
    try:
        result = make("serve", f"CONFIG={mesh.config}", "LLM=on")
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"llm: SERVING on 127.0.0.1:{mesh.llm_port}" in result.stdout
        yield mesh
    finally:
        make("stop", f"CONFIG={mesh.config}")
    assert not listening(mesh.llm_port), "make stop left the embedded LLM running"


def test_a_heist_on_the_embedded_model_leaves_a_complete_audit(served: Mesh, tmp_path: Path) -> None:
    run = subprocess.run(
        [str(REPO_ROOT / ".venv" / "bin" / "orchestrator"), "run", "--config", str(served.config),
         "--turns", str(TURNS), "--require-healthy", "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    session_id = re.search(r"Session:\s+(heist_\d{8}_\d{6}_[0-9a-f]{16}) \(completed\)", run.stdout)
    assert session_id, run.stdout
    session = session_id.group(1)
    report = run.stdout.rstrip().splitlines()[-1]  # `make run` ends with the report's path
    assert report == f"Report:     {tmp_path / session}.html", run.stdout
    assert 'class="waterfall-chart"' in (tmp_path / f"{session}.html").read_text()

    audit = sqlite3.connect(served.run_dir / "audit" / "heist.db")
    assert audit.execute("SELECT status, num_turns FROM sessions WHERE session_id = ?", (session,)).fetchall() == [
        ("completed", TURNS)
    ]
    messages = audit.execute(
        "SELECT turn_id, agent_name, message FROM messages WHERE session_id = ? ORDER BY turn_id", (session,)
    ).fetchall()
    assert [(turn, agent) for turn, agent, _ in messages] == [
        (1, "planner"), (2, "hacker"), (3, "safecracker"), (4, "mole")
    ]  # fmt: skip
    # The real model answered every turn (no "Error generating response" rows).
    assert all(text and not text.startswith("Error generating response") for _, _, text in messages), messages
    # prefill_tool_every: 2 makes each tool agent's first turn a real tool call over gRPC
    # (the model may add markers of its own; those are audited too).
    tools = audit.execute(
        "SELECT agent_name, tool_name FROM tool_usage WHERE session_id = ? ORDER BY id", (session,)
    ).fetchall()
    first_call_of = {agent: tool for agent, tool in reversed(tools)}
    assert first_call_of == {"hacker": "file_reader", "safecracker": "calculator", "mole": "database_query"}, tools
    # llm.constrained_tools: auto (shipped): the llama.cpp server takes the grammar, so every argument of a
    # marker for the agent's own tool was generated under it, and the services accept each one. (A marker
    # naming another agent's tool is refused as NOT_ALLOWED: the grammar does not choose the tool.)
    calls = audit.execute(
        "SELECT agent_name, tool_name, tool_params, status_code, tool_result FROM tool_usage WHERE session_id = ?",
        (session,),
    ).fetchall()
    own_tool_calls = [call for call in calls if call[3] != "NOT_ALLOWED"]
    assert len(own_tool_calls) >= 3 and all(call[3] == "OK" for call in own_tool_calls), calls
    assert not audit.execute(
        "SELECT detail FROM events WHERE session_id = ? AND operation = 'constrained_tools'", (session,)
    ).fetchall()
    # A prefilled turn is two requests: the argument under the grammar, then the rest of the line.
    hacker_steps = json.loads(
        audit.execute("SELECT timings FROM messages WHERE session_id = ? AND turn_id = 2", (session,)).fetchone()[0]
    )["steps"]
    assert sum(step[0] == "llm" for step in hacker_steps) >= 2, hacker_steps
    llm_health = audit.execute(
        "SELECT status_code FROM events WHERE session_id = ? AND service = 'llm' AND operation = 'health_check'",
        (session,),
    ).fetchall()
    assert llm_health == [("SERVING",)]
    # The tool servers logged this session's calls under the same ID (access logs are flushed every 0.2 s).
    for service in ("calculator", "file_reader", "database_query"):
        log_file = served.run_dir / "log" / f"{service}.log"
        deadline = time.monotonic() + 5.0
        while not logged(log_file, session) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert logged(log_file, session), service
    assert sorted(p.suffix for p in tmp_path.glob(f"{session}.*")) == [".html", ".json", ".md"]
    # The llama.cpp server reports each request's usage: every turn's tokens are counted, none estimated.
    tokens = audit.execute(
        "SELECT prompt_tokens, completion_tokens, tokens_estimated FROM messages WHERE session_id = ? ORDER BY turn_id",
        (session,),
    ).fetchall()
    assert len(tokens) == TURNS and all(p > 0 and c > 0 and e == 0 for p, c, e in tokens), tokens
    prompt, completion = sum(p for p, _, _ in tokens), sum(c for _, c, _ in tokens)
    assert f"LLM tokens: {prompt + completion} ({prompt} prompt + {completion} completion)" in run.stdout


def test_a_budget_crossed_on_the_embedded_model_fails_the_session(served: Mesh, tmp_path: Path) -> None:
    config = yaml.safe_load(served.config.read_text())
    hacker = next(agent for agent in config["agents"] if agent["name"] == "hacker")
    hacker["max_llm_tokens"] = 1  # crossed by the hacker's first turn, the second of the session
    budget_config = tmp_path / "budget.yaml"
    budget_config.write_text(yaml.safe_dump(config))
    run = subprocess.run(
        [str(REPO_ROOT / ".venv" / "bin" / "orchestrator"), "run", "--config", str(budget_config),
         "--turns", str(TURNS), "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    found = re.search(r"Session:\s+(heist_\S+) \(failed\)", run.stdout)
    assert found, run.stdout
    assert "Error:      budget: hacker used " in run.stderr and "over its max_llm_tokens = 1" in run.stderr
    audit = sqlite3.connect(served.run_dir / "audit" / "heist.db")
    row = audit.execute("SELECT status, num_turns, error FROM sessions WHERE session_id = ?", (found.group(1),))
    status, turns, error = row.fetchone()
    assert (status, turns) == ("failed", 2) and error.startswith("budget: hacker used ")
    crossing = audit.execute(
        "SELECT agent_name, prompt_tokens + completion_tokens FROM messages WHERE session_id = ? AND turn_id = 2",
        (found.group(1),),
    ).fetchone()
    assert crossing[0] == "hacker" and crossing[1] > 1


def logged(log_file: Path, session: str) -> bool:
    return any(entry["session"] == session for entry in access_entries(log_file.read_text()))


def test_killing_the_model_mid_run_fails_the_session_and_serve_restarts_it(served: Mesh) -> None:
    run = subprocess.Popen(
        [str(REPO_ROOT / ".venv" / "bin" / "orchestrator"), "run", "--config", str(served.config), "--turns", "12"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert run.stdout is not None
        seen = ""
        for line in run.stdout:
            seen += line
            if line.startswith("[turn 2]"):
                break
        assert "[turn 2]" in seen, seen
        pid = int((served.run_dir / "run" / "llm.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 1, seen + out + err
    assert "(failed)" in out and "turns in a row failed" in err and "llm.log" in err
    assert out.count("Error generating response") <= 3, out

    status = make("status", f"CONFIG={served.config}")
    assert status.returncode != 0
    assert re.search(r"^llm\s.*DOWN \(exited\)", status.stdout, re.M), status.stdout
    assert "last lines of" in status.stdout and "llm.log" in status.stdout

    again = make("serve", f"CONFIG={served.config}", "LLM=on")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"llm: SERVING on 127.0.0.1:{served.llm_port}" in again.stdout
    assert int((served.run_dir / "run" / "llm.pid").read_text().split()[0]) != pid
