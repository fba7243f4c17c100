"""Fixtures for contract tests: in-process servers on ephemeral ports with a temporary run folder."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from heist_common.config import HeistConfig, load_config
from tests.support.config import write_heist_config
from tests.support.inprocess import InProcessMesh

CONTRACT_LIMITS = {"database_query": {"query_timeout_s": 0.3}}


@pytest.fixture
def config(tmp_path: Path) -> HeistConfig:
    return load_config(write_heist_config(tmp_path, limits=CONTRACT_LIMITS))


@pytest.fixture
async def mesh(config: HeistConfig) -> AsyncIterator[InProcessMesh]:
    running = InProcessMesh(config)
    try:
        yield running
    finally:
        await running.stop_all()


async def expect_code(call: Awaitable[Any], code: grpc.StatusCode, fragment: str = "") -> str:
    """Await a call that must fail with ``code`` (and a message containing ``fragment``); return the message."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    details = caught.value.details() or ""
    assert fragment.lower() in details.lower(), details
    return details


@pytest.fixture
def fails_with() -> Callable[..., Awaitable[str]]:
    return expect_code
