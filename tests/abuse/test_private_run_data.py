"""Run data is private: after `make serve` and a session, nothing under the run folder is readable by other users.

The attack this answers: another local user read the audit database, the logs and
the session exports (0644 under a 0755 folder). Every process runs here with the
test's umask (0022, the usual default), as it would from a login shell, and a
folder and a log file left world-readable by an older version must be tightened
when they are used again.
"""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

from heist_common.layout import REPO_ROOT
from tests.support.config import SERVICES, write_heist_config
from tests.support.ports import free_ports
from tests.support.scripted_llm import ScriptedLLM, inline_tool, text

TIMEOUT_S = 120


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, umask=0o022
    )


def _loose_entries(root: Path) -> list[str]:
    """Every folder not 0700 and every regular file not 0600 under ``root`` (sockets and fifos are allowed)."""
    found = []
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISDIR(info.st_mode) and mode != 0o700:
            found.append(f"{path.relative_to(root.parent)}/ {mode:o}")
        elif stat.S_ISREG(info.st_mode) and mode != 0o600:
            found.append(f"{path.relative_to(root.parent)} {mode:o}")
        elif stat.S_ISLNK(info.st_mode):
            found.append(f"{path.relative_to(root.parent)} is a symlink")
    return found


def test_serve_and_a_session_leave_nothing_readable_by_others(tmp_path: Path) -> None:
    ports = free_ports(len(SERVICES))
    addresses = {name: f"127.0.0.1:{port}" for name, port in zip(SERVICES, ports, strict=True)}
    with ScriptedLLM() as llm:
        config = write_heist_config(
            tmp_path,
            llm_base_url=llm.base_url,
            addresses=addresses,
            database={},  # the default: <run_dir>/audit/heist.db
        )
        run_dir = tmp_path / "run"
        for folder in ("log", "sessions"):  # left behind by an older version
            (run_dir / folder).mkdir(parents=True)
            (run_dir / folder).chmod(0o755)
        old_log = run_dir / "log" / "calculator.log"
        old_log.write_text("an older run\n")
        old_log.chmod(0o644)
        run_dir.chmod(0o755)

        llm.script(text("We go Friday."), inline_tool("file_reader", "bank_layout.md"), text("Numbers check out."))
        try:
            served = _run("-m", "servers.supervisor", "serve", "--config", str(config))
            assert served.returncode == 0, served.stdout + served.stderr
            ran = _run("-m", "orchestrator.cli", "run", "--config", str(config), "--turns", "3")
            assert ran.returncode == 0, ran.stdout + ran.stderr
            exported = _run(
                "-m", "orchestrator.cli", "report", ran.stdout.split("Session:")[1].split()[0], "--config", str(config)
            )
            assert exported.returncode == 0, exported.stderr
        finally:
            stopped = _run("-m", "servers.supervisor", "stop", "--config", str(config))
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr

    audit = run_dir / "audit" / "heist.db"
    assert list((run_dir / "sessions").glob("*.md")) and audit.exists()
    # A reader makes SQLite create the -wal and -shm files, with the database file's mode.
    reader = sqlite3.connect(audit)
    try:
        assert reader.execute("SELECT count(*) FROM messages").fetchone()[0] == 3
        assert Path(f"{audit}-wal").exists() and Path(f"{audit}-shm").exists()
        assert _loose_entries(run_dir) == []
    finally:
        reader.close()
