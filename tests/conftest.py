"""Fixtures every test folder may use (helpers live in tests/support, never imported from here).

``audit_url`` is parametrised over both audit engines, so a test that takes it
runs twice: against a fresh SQLite file and against a fresh database on a
throwaway PostgreSQL cluster (``tests.support.postgres``), started once per test
session and only when a test asks for it. ``redis_url`` is a real redis-server.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.postgres import PostgresCluster, running_cluster
from tests.support.redis_server import RedisServer

ENGINES = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the whole run."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The server's URL, emptied for this test."""
    redis.Redis.from_url(redis_server.url).flushdb()
    return redis_server.url


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL server for the whole test session; stopped and deleted at the end."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture(params=ENGINES)
def audit_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty audit database URL, once per engine."""
    if request.param == "sqlite":
        (tmp_path / "audit").mkdir(exist_ok=True)
        return f"sqlite:///{tmp_path / 'audit' / 'heist.db'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return cluster.database()

@pytest.fixture(scope="session", autouse=True)
def _no_span_export_from_the_callers_environment() -> Iterator[None]:
    """A developer's OTEL_* variables (set for ``make serve``) must not make tests export spans or change them.

    Tests that want export pass the variables to the processes they start.
    """
    saved = {key: os.environ.pop(key) for key in list(os.environ) if key.startswith("OTEL_")}
    yield
    os.environ.update(saved)
