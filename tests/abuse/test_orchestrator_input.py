"""The orchestrator under bad input: a documented exit code and one line, never a traceback, nothing lost.

Every case runs ``orchestrator`` as a real process against real server
processes and the scripted LLM endpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from heist_common.layout import REPO_ROOT
from tests.support.access_log import calls
from tests.support.processes import ProcessMesh
from tests.support.scripted_llm import ScriptedLLM, hang, text

pytestmark = pytest.mark.abuse


@pytest.fixture(scope="module")
def endpoint() -> Iterator[ScriptedLLM]:
    with ScriptedLLM() as llm:
        yield llm


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, endpoint: ScriptedLLM) -> Iterator[ProcessMesh]:
    with ProcessMesh(tmp_path_factory.mktemp("abuse-cli"), llm_base_url=endpoint.base_url) as running:
        yield running


def orchestrator(mesh: ProcessMesh, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "orchestrator.cli", *args, "--config", str(mesh.config_path)]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, "an error says what went wrong"
    return lines[-1]


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (("run", "--turns", "1000000000000"), 2, "--turns must be 1 to 10000"),
        (("run", "--turns", "0"), 2, "--turns must be 1 to 10000"),
        (("run", "--seed", str(2**64)), 2, "must be from 0 to 2**63-1"),
        (("run", "--seed", "seven"), 2, "not an integer"),
        (("run", "--db", "mongodb://x/y"), 2, "unsupported database URL"),
        (("run", "--db", "postgresql://bob:hunter2@nowhere.invalid/x", "--turns", "1"), 4, "cannot open"),
        (("sessions", "--db", "sqlite:////nonexistent-folder/x.db"), 4, "no audit database"),
        (("show", "heist_x", "--db", "sqlite:////nonexistent-folder/x.db"), 4, "no audit database"),
        (("run", "--session-id", "../../etc/passwd", "--turns", "1"), 2, "invalid session ID"),
    ],
)
def test_bad_arguments_get_a_documented_code_and_one_line(
    mesh: ProcessMesh, args: tuple[str, ...], code: int, fragment: str
) -> None:
    started = time.monotonic()
    result = orchestrator(mesh, *args)
    assert result.returncode == code, result.stdout + result.stderr
    line = one_line_error(result)
    assert fragment in line, line
    assert "hunter2" not in result.stdout + result.stderr, "a database password is never printed"
    assert time.monotonic() - started < 20


def test_run_into_a_missing_folder_creates_nothing(mesh: ProcessMesh, tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "folder" / "audit.db"
    result = orchestrator(mesh, "run", "--turns", "1", "--db", f"sqlite:///{target}")
    assert result.returncode == 4 and "does not exist" in one_line_error(result)
    assert not (tmp_path / "no").exists()


def test_unwritable_log_folder_fails_before_the_run(mesh: ProcessMesh, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = orchestrator(mesh, "run", "--turns", "1", "--out", str(blocker / "logs"))
    assert result.returncode == 1 and "cannot write session logs" in one_line_error(result)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(b"\xff\xfe\x00 not utf-8", "not UTF-8"), (b"[" * 100_000, "nested too deeply"), (b"a: b: c:", "invalid YAML")],
)
def test_broken_config_files_exit_3(mesh: ProcessMesh, tmp_path: Path, content: bytes, fragment: str) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_bytes(content)
    command = [sys.executable, "-m", "orchestrator.cli", "sessions", "--config", str(broken)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3 and fragment in one_line_error(result)


def test_sigterm_marks_the_session_interrupted(mesh: ProcessMesh, endpoint: ScriptedLLM) -> None:
    endpoint.reset()
    endpoint.script(text("We go on Friday."), hang(30))
    command = [sys.executable, "-m", "orchestrator.cli", "run", "--config", str(mesh.config_path)]
    process = subprocess.Popen(
        [*command, "--turns", "4", "--session-id", "heist_abuse_sigterm"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while len(endpoint.chat_requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130 and "Traceback" not in err, err
    assert mesh.rows("SELECT status FROM sessions WHERE session_id = ?", "heist_abuse_sigterm") == [("interrupted",)]
    assert mesh.rows("SELECT COUNT(*) FROM messages WHERE session_id = ?", "heist_abuse_sigterm") == [(1,)]


def test_model_output_cannot_drive_the_terminal(mesh: ProcessMesh, endpoint: ScriptedLLM) -> None:
    endpoint.reset()
    endpoint.script(text("Plan \x1b[2J\x1b[31mRED\x1b[0m and a bell\x07."))
    result = orchestrator(mesh, "run", "--turns", "1", "--session-id", "heist_abuse_escape")
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "\\x1b[2J" in result.stdout
    shown = orchestrator(mesh, "show", "heist_abuse_escape")
    assert shown.returncode == 0 and "\x1b" not in shown.stdout and "\\x1b[31mRED" in shown.stdout
    stored = mesh.rows("SELECT message FROM messages WHERE session_id = ?", "heist_abuse_escape")
    assert stored == [("Plan \x1b[2J\x1b[31mRED\x1b[0m and a bell\x07.",)], "the audit keeps what was said"


def test_a_huge_reply_is_stored_once_not_every_turn(mesh: ProcessMesh, endpoint: ScriptedLLM) -> None:
    endpoint.reset()
    endpoint.script(text("x" * 100_000), *[text(f"Line {n}.") for n in range(2, 13)])
    memory_log = mesh.servers["memory"]
    before = len(calls(memory_log.log(), "StoreMemory"))
    result = orchestrator(mesh, "run", "--turns", "12", "--session-id", "heist_abuse_huge")
    assert result.returncode == 0, result.stderr
    time.sleep(0.5)  # the access log is flushed every 0.2 s
    stored = len(calls(memory_log.log(), "StoreMemory")) - before
    assert stored == 12, f"{stored} StoreMemory calls for 12 turns"
