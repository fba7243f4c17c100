"""Fixtures of the abuse suite (helpers: tests/abuse/harness.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.abuse.harness import RunningService, start_service, stop_service


@pytest.fixture(scope="module")
def service_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RunningService]]:
    """``make(name, scope, limits, metrics=False)`` starts a server process for this module; all stop at its end."""
    started: list[RunningService] = []

    def make(name: str, scope: str, limits: dict[str, Any], *, metrics: bool = False) -> RunningService:
        service = start_service(tmp_path_factory.mktemp(name), name, scope, limits, metrics=metrics)
        started.append(service)
        return service

    try:
        yield make
    finally:
        for service in started:
            stop_service(service)


