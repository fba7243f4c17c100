"""Drill: the memory service's Redis is killed and restarted under a running memory server process.

What must hold: grpc.health.v1 (Check and Watch) says NOT_SERVING while Redis is
unreachable and SERVING once it is back; a call meanwhile fails UNAVAILABLE
(which callers retry) with the reason, never INTERNAL; the log has no traceback.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from heist.memory.v1 import memory_pb2, memory_pb2_grpc

from tests.support import channels
from tests.support.processes import ProcessMesh, health_status
from tests.support.redis_server import RedisServer
from tests.support.tokens import session_metadata

pytestmark = pytest.mark.drill

MEMORY_SERVICE = "heist.memory.v1.MemoryService"
NOTICE_S = 5.0
"""How long the server may take to notice (it probes about once a second)."""
SESSION = "heist_drill_redis"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own: it is killed and restarted, so never the suite's shared one."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mesh(tmp_path: Path, own_redis: RedisServer) -> Iterator[ProcessMesh]:
    mesh = ProcessMesh(tmp_path, memory_store=own_redis.url, metrics=False)
    try:
        yield mesh.start("memory")
    finally:
        mesh.stop()


class HealthWatch:
    """Every status a grpc.health.v1 Watch stream on ``service`` delivers, collected on a thread."""

    def __init__(self, mesh: ProcessMesh, service: str) -> None:
        self.statuses: list[str] = []
        self._channel = channels.channel(mesh.config, "memory", mesh.address("memory"))
        self._stream = health_pb2_grpc.HealthStub(self._channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=120
        )
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        try:
            for response in self._stream:
                self.statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
        except grpc.RpcError:
            pass  # cancelled at the end of the test

    def close(self) -> None:
        self._stream.cancel()
        self._thread.join(timeout=5)
        self._channel.close()


def wait_for_status(mesh: ProcessMesh, wanted: str) -> float:
    """Seconds until memory's health (server and service) is ``wanted``; fails after NOTICE_S."""
    started = time.monotonic()
    while time.monotonic() - started < NOTICE_S:
        address = mesh.address("memory")
        server = health_status(mesh.config, "memory", address)
        if server == wanted == health_status(mesh.config, "memory", address, grpc_service=MEMORY_SERVICE):
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"memory health is not {wanted} after {NOTICE_S} s:\n{mesh.servers['memory'].log()}")


def store_memory(mesh: ProcessMesh, turn: int) -> memory_pb2.StoreMemoryResponse:
    with channels.channel(mesh.config, "memory", mesh.address("memory")) as channel:
        request = memory_pb2.StoreMemoryRequest(agent_name="planner", turn_id=turn, message=f"turn {turn}")
        response: memory_pb2.StoreMemoryResponse = memory_pb2_grpc.MemoryServiceStub(channel).StoreMemory(
            request, metadata=session_metadata(mesh.config, SESSION), timeout=5
        )
        return response


def test_redis_outage_is_not_serving_and_unavailable_then_serving_again(
    mesh: ProcessMesh, own_redis: RedisServer
) -> None:
    assert store_memory(mesh, 1).agent_memory_count == 1
    watch = HealthWatch(mesh, MEMORY_SERVICE)
    try:
        assert own_redis.process is not None
        own_redis.process.kill()  # kill -9: no goodbye to the memory server's connections
        own_redis.process.wait(timeout=5)
        wait_for_status(mesh, "NOT_SERVING")

        with pytest.raises(grpc.RpcError) as refused:
            store_memory(mesh, 2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
        assert "memory store" in (refused.value.details() or "") and "unreachable" in (refused.value.details() or "")

        own_redis.start()  # the same port, empty: Redis had no persistence
        wait_for_status(mesh, "SERVING")
        assert store_memory(mesh, 3).agent_memory_count == 1
        time.sleep(0.3)  # the Watch stream's last message is on its way
    finally:
        watch.close()

    assert watch.statuses == ["SERVING", "NOT_SERVING", "SERVING"], "Watch subscribers hear of both changes"
    log = mesh.servers["memory"].log()
    assert "Traceback" not in log, log
    assert "NOT_SERVING: the memory store (Redis at" in log and "SERVING again" in log
