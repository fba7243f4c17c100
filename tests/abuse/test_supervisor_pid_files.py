"""Stale pid files: a stranger on a recorded pid is never reported as the service, never signalled.

The decoy is what a reused pid looks like at its worst: a process whose
arguments contain ``servers.calculator`` (the supervisor's old identity check),
leading its own process group with a child, so ``stop``'s group signal would
take both. The test stops it by its PID.
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

from heist_common.config import load_config
from tests.support.config import write_heist_config
from tests.support.processes import stop_process

pytestmark = pytest.mark.abuse

DECOY = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(60)\n"
)


class Decoy:
    """A process whose command line names ``servers.calculator``, with a child in its process group."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", DECOY, "servers.calculator"],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        self.child_pid = int(self.process.stdout.readline())
        self.child_started = process_start_time(self.child_pid)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None and _alive(self.child_pid)

    def stop(self) -> None:
        if _alive(self.child_pid) and process_start_time(self.child_pid) == self.child_started:
            os.kill(self.child_pid, signal.SIGTERM)
        stop_process(self.process, grace_s=5)


def process_start_time(pid: int) -> int:
    """``/proc/<pid>/stat`` field 22: clock ticks since boot (counted after the command name's last ")")."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture
def decoy() -> Iterator[Decoy]:
    made = Decoy()
    try:
        yield made
    finally:
        made.stop()


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = write_heist_config(tmp_path, transport="plaintext")  # status needs no certificates then
    load_config(path).mesh.pid_dir.mkdir(parents=True)
    return path


def supervisor(command: str, config_path: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "servers.supervisor", command, "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout + done.stderr


def calculator_row(status_output: str) -> list[str]:
    row = next(line for line in status_output.splitlines() if line.startswith("calculator "))
    return row.split()


def pid_file(config_path: Path) -> Path:
    return load_config(config_path).mesh.pid_dir / "calculator.pid"


def test_an_older_pid_file_on_a_decoy_is_unverifiable_and_left_alone(config_path: Path, decoy: Decoy) -> None:
    pid_file(config_path).write_text(f"{decoy.pid}\n")  # the pid alone: written by an older version

    status = supervisor("status", config_path)
    assert calculator_row(status)[2] == "-", "the decoy is not shown as the calculator's process"
    assert f"holds pid {decoy.pid} without a start time" in status and "not signalled" in status

    stopped = supervisor("stop", config_path)
    time.sleep(0.5)  # a signal sent would have landed by now
    assert decoy.alive(), f"stop signalled the decoy or its child:\n{stopped}"
    assert f"calculator: stopped (pid {decoy.pid})" not in stopped
    assert f"kill {decoy.pid}" in stopped, "stop names the pid it leaves alone"
    assert pid_file(config_path).exists(), "kept: the warning repeats until that process ends"


def test_a_reused_pid_is_stale_not_running(config_path: Path, decoy: Decoy) -> None:
    started = process_start_time(decoy.pid)
    # What a pid file says when its service died and the kernel gave the pid to the decoy since.
    pid_file(config_path).write_text(f"{decoy.pid} {started - 1}\n")

    status = supervisor("status", config_path)
    row = calculator_row(status)
    assert row[2] == "-" and row[3] == "DOWN", status

    stopped = supervisor("stop", config_path)
    time.sleep(0.5)
    assert decoy.alive(), f"stop signalled the decoy or its child:\n{stopped}"
    assert "nothing running" in stopped
    assert not pid_file(config_path).exists(), "a stale pid file is removed"


def test_a_matching_pid_and_start_time_is_stopped(config_path: Path, decoy: Decoy) -> None:
    # The same decoy recorded with its real start time is, as far as pid files can tell, the service.
    pid_file(config_path).write_text(f"{decoy.pid} {process_start_time(decoy.pid)}\n")
    assert calculator_row(supervisor("status", config_path))[2] == str(decoy.pid)
    stopped = supervisor("stop", config_path)
    assert f"calculator: stopped (pid {decoy.pid})" in stopped
    decoy.process.wait(timeout=10)
    assert not decoy.alive()
