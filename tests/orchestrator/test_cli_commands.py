"""Every CLI command, in a worker thread (the servers run in the test's event loop) or as a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.cli import main
from tests.support.config import write_heist_config
from tests.support.inprocess import InProcessMesh, audit_rows
from tests.support.scripted_llm import ScriptedLLM, hang, inline_tool, text

REPO = Path(__file__).resolve().parents[2]


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


@pytest.fixture
def live_config(mesh: InProcessMesh, config_path: Path, tmp_path: Path) -> Path:
    return mesh.write_config(config_path, tmp_path / "live.yaml")


async def test_run_then_sessions_show_export(
    live_config: Path,
    mesh: InProcessMesh,
    scripted_llm: ScriptedLLM,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    scripted_llm.script(text("We go Friday."), inline_tool("file_reader", "bank_layout.md"))
    out_dir = tmp_path / "logs"
    code = await cli(
        "run", "--config", str(live_config), "--turns", "2", "--session-id", "heist_cli_1", "--out", str(out_dir)
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "[turn 1] planner (Mastermind): We go Friday." in printed
    assert "tool file_reader.ReadFile" in printed
    assert "All services healthy." in printed
    assert "Session:    heist_cli_1 (completed)" in printed and "Tool calls: 1 ok, 0 failed" in printed
    assert (out_dir / "heist_cli_1.json").exists() and (out_dir / "heist_cli_1.md").exists()
    assert printed.rstrip().splitlines()[-1] == f"Report:     {out_dir / 'heist_cli_1.html'}"  # what make run ends with
    assert (out_dir / "heist_cli_1.html").read_text().startswith("<!DOCTYPE html>")

    assert await cli("sessions", "--config", str(live_config)) == 0
    listing = capsys.readouterr().out
    assert "heist_cli_1" in listing and "completed" in listing

    assert await cli("show", "heist_cli_1", "--config", str(live_config)) == 0
    shown = capsys.readouterr().out
    assert "Turn 2  hacker (Hacker)" in shown and "file_reader.ReadFile" in shown
    assert "###" not in shown and "\\" not in shown  # a terminal view, not the Markdown file

    target = tmp_path / "export.json"
    assert (
        await cli("export", "heist_cli_1", "--format", "json", "--out", str(target), "--config", str(live_config)) == 0
    )
    assert capsys.readouterr().out == f"wrote {target}\n"
    exported = json.loads(target.read_text())
    assert exported["session"]["status"] == "completed"
    assert [m["agent_name"] for m in exported["messages"]] == ["planner", "hacker"]
    assert exported["tool_usage"][0]["tool_name"] == "file_reader"
    assert any(e["operation"] == "health_check" for e in exported["events"])

    assert await cli("export", "heist_cli_1", "--format", "md", "--config", str(live_config)) == 0
    assert capsys.readouterr().out.startswith("# Heist session heist_cli_1")


async def test_run_flags_override_llm_and_db(
    live_config: Path, scripted_llm: ScriptedLLM, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with ScriptedLLM(text("from the other model")) as other:
        db = tmp_path / "other.db"
        code = await cli(
            "run",
            "--config",
            str(live_config),
            "--turns",
            "1",
            "--llm-base-url",
            other.base_url,
            "--model",
            "other-model",
            "--db",
            f"sqlite:///{db}",
            "--seed",
            "3",
        )
        assert code == 0
        assert other.chat_requests[0]["model"] == "other-model"
    assert scripted_llm.chat_requests == []
    assert db.exists() and "from the other model" in capsys.readouterr().out


async def test_health_command(live_config: Path, mesh: InProcessMesh, capsys: pytest.CaptureFixture[str]) -> None:
    assert await cli("health", "--config", str(live_config)) == 0
    table = capsys.readouterr().out
    assert "memory" in table and "SERVING" in table and "llm" in table
    await mesh.stop("memory")
    assert await cli("health", "--config", str(live_config)) == 6
    assert "UNREACHABLE" in capsys.readouterr().out


async def test_require_healthy_exit_code(
    live_config: Path, mesh: InProcessMesh, scripted_llm: ScriptedLLM, capsys: pytest.CaptureFixture[str]
) -> None:
    await mesh.stop("calculator")
    assert await cli("run", "--config", str(live_config), "--require-healthy") == 6
    assert "degraded services: calculator" in capsys.readouterr().out
    assert scripted_llm.chat_requests == []


async def test_error_exit_codes(config_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert await cli("show", "heist_nope", "--config", str(config_path)) == 4
    assert "no audit database at" in capsys.readouterr().err
    assert not (tmp_path / "audit.db").exists(), "show never creates a database"
    assert await cli("sessions", "--config", str(tmp_path / "missing.yaml")) == 3
    assert "configuration error" in capsys.readouterr().err
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    assert await cli("sessions", "--config", str(config_path), "--db", f"sqlite:///{blocker}/x/heist.db") == 4
    assert "no audit database at" in capsys.readouterr().err


def test_missing_mtls_certificates_are_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """mTLS with no certificates yet (no ``make serve``): one line naming the fix and exit 3, not a traceback."""
    path = write_heist_config(tmp_path, "fresh.yaml", llm_base_url="http://127.0.0.1:9/v1", transport="mtls")
    for command in (["health"], ["run", "--turns", "1"]):
        assert main(["--config", str(path), *command]) == 3
        err = capsys.readouterr().err
        assert err.startswith("orchestrator: credentials: mTLS CA ") and "make serve" in err
        assert "Traceback" not in err and err.count("\n") == 1


def test_help_on_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ([], ["run"], ["health"], ["sessions"], ["show"], ["export"]):
        with pytest.raises(SystemExit) as exited:
            main([*command, "--help"])
        assert exited.value.code == 0
        assert "usage: orchestrator" in capsys.readouterr().out


def test_console_script_freezes_the_heap_once_the_command_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    """The installed ``orchestrator`` is ``console_main``: main's exit code, then ``gc.freeze()`` (even on ``--help``).

    Freezing after the command spares the interpreter's shutdown its full collections (the
    start-up benchmark's floors end the same way); freezing before it, or in ``main``, would stop
    the collector of a long session or of the tests that call ``main``.
    """
    import gc
    import tomllib

    from orchestrator import cli as cli_module

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["orchestrator"] == "orchestrator.cli:console_main"

    steps: list[str] = []
    monkeypatch.setattr(gc, "freeze", lambda: steps.append("freeze"))

    def command() -> int:
        steps.append("main")
        return 6

    monkeypatch.setattr(cli_module, "main", command)
    assert cli_module.console_main() == 6
    assert steps == ["main", "freeze"]

    def usage() -> int:
        steps.append("main")
        raise SystemExit(0)

    steps.clear()
    monkeypatch.setattr(cli_module, "main", usage)
    with pytest.raises(SystemExit):
        cli_module.console_main()
    assert steps == ["main", "freeze"]


def test_inspection_commands_load_no_async_grpc_or_spare_database_engines(tmp_path: Path) -> None:
    """``sessions``/``show``/``export`` on a SQLite file stay synchronous and SQLite-only (their start-up is the point).

    asyncio, gRPC and ``playhouse.db_url`` (which imports every engine it knows) cost a command
    that only reads one file a tenth of a second or more; ``playhouse.migrate`` only an old file needs.
    """
    from heist_common.audit import AuditStore

    config = write_heist_config(tmp_path)
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    store = AuditStore.open(url)
    try:
        asyncio.run(store.create_session("heist_lean", strategy="round_robin", seed=None, model="m"))
    finally:
        store.close()
    heavy = ("asyncio", "grpc", "playhouse.db_url", "playhouse.migrate", "orchestrator.llm.client")
    for command in (["sessions"], ["show", "heist_lean"], ["export", "heist_lean", "--format", "md"]):
        code = (
            "import sys; from orchestrator.cli import main; code = main(sys.argv[1:]); "
            f"print('loaded:', [name for name in {heavy!r} if name in sys.modules]); sys.exit(code)"
        )
        completed = subprocess.run(
            [sys.executable, "-c", code, "--config", str(config), "--db", url, *command],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr
        assert "heist_lean" in completed.stdout
        assert completed.stdout.rstrip().endswith("loaded: []"), (command, completed.stdout[-300:])


def test_default_config_from_env(
    tmp_path: Path, config_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HEIST_CONFIG", str(config_path))
    monkeypatch.chdir(tmp_path)
    assert main(["sessions"]) == 0
    assert "No sessions yet." in capsys.readouterr().out


async def test_ctrl_c_marks_interrupted_and_exits_130(
    live_config: Path, mesh: InProcessMesh, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script(text("first"), hang(30))
    command = [
        str(Path(sys.executable).parent / "orchestrator"),
        "run",
        "--config",
        str(live_config),
        "--session-id",
        "heist_sigint",
    ]
    proc = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        deadline = time.monotonic() + 30
        while len(scripted_llm.chat_requests) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _out, err = await asyncio.to_thread(proc.communicate, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err
    assert audit_rows(mesh.config, "SELECT status, num_turns FROM sessions WHERE session_id = 'heist_sigint'") == [
        ("interrupted", 1)
    ]
