"""Fixtures every test folder may use (helpers live in tests/support, never imported from here)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

from tests.support.redis_server import RedisServer


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


@pytest.fixture(scope="session", autouse=True)
def _no_span_export_from_the_callers_environment() -> Iterator[None]:
    """A developer's OTEL_* variables (set for ``make serve``) must not make tests export spans or change them.

    Tests that want export pass the variables to the processes they start.
    """
    saved = {key: os.environ.pop(key) for key in list(os.environ) if key.startswith("OTEL_")}
    yield
    os.environ.update(saved)
