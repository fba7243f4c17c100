"""A throwaway PostgreSQL server for tests: ``initdb`` and ``pg_ctl`` in a temp folder, on a free loopback port.

Why a real server and not a mock: the audit store's guarantees (one transaction
per turn, concurrent writers, schema creation and in-place migrations) are the
database's behaviour, so they are tested against the real thing. The binaries
come from Debian's ``postgresql`` package (``make test`` installs it when run as
root). PostgreSQL refuses to run as root, so when the tests run as root the
cluster belongs to an unprivileged system user (``heist-test``, created when
missing) and its commands run through ``runuser``.

The cluster listens on 127.0.0.1 only, with its socket in the temp folder and
trust authentication (nothing but this machine's own tests can reach it); each
test gets its own database. ``stop()`` ends the server (``pg_ctl stop -m
fast``) and deletes the folder.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.ports import free_port

__all__ = ["INSTALL_HINT", "PostgresCluster", "find_bindir"]

CLUSTER_USER = "heist-test"
"""The unprivileged owner of the test cluster when the tests run as root."""
SUPERUSER = "heist"
"""The cluster's database superuser (the role the tests connect as)."""
INSTALL_HINT = (
    "PostgreSQL's server programs (initdb, pg_ctl) are not installed: "
    "run `sudo apt-get install postgresql` (Debian/Ubuntu), or `make test` as root, which installs it"
)
START_ATTEMPTS = 3
"""Another process can take the free port between choosing it and the server binding it; try again."""
COMMAND_TIMEOUT_S = 60.0


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.parent.name)) or (0,)


def find_bindir() -> Path | None:
    """Folder holding ``initdb`` and ``pg_ctl``: ``$HEIST_PG_BINDIR``, Debian's newest version, or the PATH."""
    override = os.environ.get("HEIST_PG_BINDIR")
    candidates = [Path(override) / "initdb"] if override else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=_version_key, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path))
    for initdb in candidates:
        if initdb.is_file() and (initdb.parent / "pg_ctl").is_file():
            return initdb.parent
    return None


def _ensure_user(name: str) -> pwd.struct_passwd:
    """The cluster's system user, created (no home, no login shell) if it does not exist yet."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
             name],
            check=True, capture_output=True, timeout=COMMAND_TIMEOUT_S,
        )  # fmt: skip
        return pwd.getpwnam(name)


class PostgresCluster:
    """One PostgreSQL server in a temp folder; ``start()`` then ``database()`` per test, ``stop()`` at the end."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root: Path | None = None
        self.port = 0
        self._as_user: list[str] = []

    @property
    def data_dir(self) -> Path:
        assert self.root is not None, "cluster not started"
        return self.root / "data"

    def _run(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self._as_user, *command], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, cwd="/"
        )

    def start(self) -> PostgresCluster:
        """Create the cluster and start its server; raises RuntimeError with the server's log if it cannot."""
        # Not under pytest's tmp_path: that folder is 0700 root's, which the cluster's user cannot enter.
        self.root = Path(tempfile.mkdtemp(prefix="heist-pg-"))
        if os.geteuid() == 0:
            user = _ensure_user(CLUSTER_USER)
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as_user = ["runuser", "-u", CLUSTER_USER, "--"]
        initdb = self._run(
            str(self.bindir / "initdb"), "-D", str(self.data_dir), "--username", SUPERUSER, "--auth", "trust",
            "--encoding", "UTF8", "--locale", "C", "--no-sync", "--no-instructions",
        )  # fmt: skip
        if initdb.returncode != 0:
            self.stop()
            raise RuntimeError(f"initdb failed:\n{initdb.stdout}{initdb.stderr}")
        for attempt in range(START_ATTEMPTS):
            self.port = free_port()
            started = self._pg_ctl("start")
            if started.returncode == 0:
                return self
            log = self.log()
            if "already in use" not in log or attempt == START_ATTEMPTS - 1:
                self.stop()
                raise RuntimeError(f"pg_ctl start failed:\n{started.stdout}{started.stderr}\n{log}")
        raise AssertionError("unreachable")

    def _pg_ctl(self, action: str) -> subprocess.CompletedProcess[str]:
        assert self.root is not None
        # fsync off: a test cluster needs no crash safety, and it makes every commit cheap on a busy machine.
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c max_connections=200"
        return self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.root / "server.log"),
            "-o", options, "-m", "fast", "-w", "-t", "30", action,
        )  # fmt: skip

    def restart(self) -> None:
        """Restart the server on the same port: every open connection is cut, as in a real server restart."""
        restarted = self._pg_ctl("restart")
        if restarted.returncode != 0:
            raise RuntimeError(f"pg_ctl restart failed:\n{restarted.stdout}{restarted.stderr}\n{self.log()}")

    def halt(self) -> None:
        """Stop the server (fast: open connections are cut) but keep its data, for ``start_again``."""
        stopped = self._pg_ctl("stop")
        if stopped.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed:\n{stopped.stdout}{stopped.stderr}\n{self.log()}")

    def start_again(self) -> None:
        """Start a halted server on the same port, with its data."""
        started = self._pg_ctl("start")
        if started.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed:\n{started.stdout}{started.stderr}\n{self.log()}")

    def log(self) -> str:
        """The server's log (empty before the first start)."""
        path = self.root / "server.log" if self.root is not None else None
        return path.read_text(errors="replace") if path is not None and path.exists() else ""

    def url(self, database: str = "postgres") -> str:
        """A ``postgresql://`` URL for ``database`` on this server."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def database(self, prefix: str = "heist") -> str:
        """Create a fresh, empty database and return its URL (one per test: no test sees another's rows)."""
        import psycopg2

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        connection = psycopg2.connect(self.url())
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (fast: open connections are cut) and delete the folder; idempotent."""
        if self.root is None:
            return
        if (self.data_dir / "postmaster.pid").exists():
            stopped = self._run(
                str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "30", "stop"
            )
            if stopped.returncode != 0:
                self._kill_postmaster()
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def _kill_postmaster(self) -> None:
        """Last resort when ``pg_ctl stop`` failed: SIGKILL the postmaster this cluster started, by its pid file."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


@contextmanager
def running_cluster() -> Iterator[PostgresCluster]:
    """A new cluster, stopped and deleted afterwards.

    Missing binaries skip with the install command for a non-root developer,
    but fail as root: there ``make test`` (CI) installs them, so a skip would
    hide that the PostgreSQL tests never ran.
    """
    bindir = find_bindir()
    if bindir is None:
        if os.geteuid() == 0:
            pytest.fail(f"{INSTALL_HINT} (`make system-deps`)")
        pytest.skip(INSTALL_HINT)
    cluster = PostgresCluster(bindir).start()
    try:
        yield cluster
    finally:
        cluster.stop()
