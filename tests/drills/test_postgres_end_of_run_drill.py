"""Drill: PostgreSQL stops before a session's last writes, and comes back.

What must hold: the run says why it failed (the database's own reason), with
the database URL's password, and only it, redacted; the session's end is kept
and recorded as ``failed`` by the next run on that database (a ``reconcile``
event says so); ``orchestrator resume`` then finishes it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from heist_common.layout import REPO_ROOT
from tests.drills.script import DrillScript
from tests.support.postgres import PostgresCluster, running_cluster
from tests.support.processes import ProcessMesh
from tests.support.scripted_llm import ScriptedLLM

pytestmark = pytest.mark.drill

TURNS = 4
PASSWORD = "pg-drill-s3cret"
SESSION = "heist_drill_pg_end"
CAUSES = ("Connection refused", "terminating connection", "server closed the connection")
"""What PostgreSQL's client says when the server is gone (which one depends on the moment)."""


@pytest.fixture
def own_postgres() -> Iterator[PostgresCluster]:
    """A cluster of this test's own: it is stopped mid-run, so never the suite's shared one."""
    with running_cluster() as cluster:
        yield cluster


def orchestrator(mesh: ProcessMesh, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "orchestrator.cli", *args, "--config", str(mesh.config_path)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    assert PASSWORD not in done.stdout + done.stderr, "the database password is never printed"
    return done


def test_postgres_down_at_the_end_is_explained_then_reconciled(
    drill_mesh: Callable[..., ProcessMesh], scripted_llm: ScriptedLLM, own_postgres: PostgresCluster
) -> None:
    url = own_postgres.database().replace("heist@", f"heist:{PASSWORD}@", 1)  # trust auth: any password is fine
    mesh = drill_mesh(database={"url": url})
    mesh.start()
    scripted_llm.responder = DrillScript().at(TURNS, own_postgres.halt)  # while the last turn waits for the model

    failed = orchestrator(mesh, "run", "--turns", str(TURNS), "--session-id", SESSION)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert f"Session:    {SESSION} (failed)" in failed.stdout
    error = next(line for line in failed.stderr.splitlines() if line.startswith("Error:"))
    assert any(cause in error for cause in CAUSES), f"the cause is named: {error}"
    assert f"postgresql://heist:***@127.0.0.1:{own_postgres.port}/" in error, error
    assert "@127.0.0.1:***" not in error and error.count("***") == error.count("postgresql://"), error
    # The first write the dead database refused: the turn's, or a tool call's record (written before its RPC).
    first = ("cannot write a turn: ", "cannot record a tool call: ")
    assert any(what in error for what in first), f"the first failure's cause is not cut away: {error}"
    assert "could not be recorded" in error and "kept in" in error, error

    own_postgres.start_again()
    assert mesh.rows("SELECT status FROM sessions WHERE session_id = ?", SESSION) == [("active",)]

    following = orchestrator(mesh, "run", "--turns", "1", "--session-id", "heist_drill_pg_next")
    assert following.returncode == 0, following.stdout + following.stderr
    assert f"Recorded:   {SESSION} ended failed" in following.stdout
    [(status, end_time, recorded_error)] = mesh.rows(
        "SELECT status, end_time, error FROM sessions WHERE session_id = ?", SESSION
    )
    assert status == "failed" and end_time, "the row now says what the run said"
    assert any(cause in recorded_error for cause in CAUSES) and PASSWORD not in recorded_error
    reconciled = mesh.rows("SELECT detail FROM events WHERE session_id = ? AND operation = 'reconcile'", SESSION)
    assert len(reconciled) == 1 and "recorded late" in reconciled[0][0]
    assert not list((mesh.config.mesh.run_dir / "audit" / "unrecorded").glob("*.json")), "settled files go"

    resumed = orchestrator(mesh, "resume", SESSION)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert mesh.rows("SELECT status, num_turns FROM sessions WHERE session_id = ?", SESSION) == [("completed", TURNS)]
