"""Memory service: per-session, per-agent recent messages as compact context.

It is a cache of the orchestrator's audit database (the source of truth) and
sits on every agent turn. The store is in this process by default (each call
costs microseconds) or Redis (``services.memory.store: redis://...``), which
keeps no session state in the process, so replicas share it and a restart loses
nothing; both enforce the same quotas (``servers.memory.local_store``).

The server's grpc.health.v1 status follows the store: NOT_SERVING while Redis
cannot be reached (a PING every ``PROBE_INTERVAL_S``), SERVING again when it
answers; calls meanwhile fail UNAVAILABLE with the reason, which callers retry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
from heist.memory.v1 import memory_pb2, memory_pb2_grpc
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from heist_common.config import HeistConfig
from servers.memory.limits import Limits
from servers.memory.local_store import InProcessStore
from servers.memory.store import PROBE_INTERVAL_S, MemoryStore, QuotaError, StoreUnavailable
from servers.runtime.lifecycle import HealthProbe, ServiceDefinition
from servers.runtime.middleware import CALLER, session_id

TRUNCATION_MARK = "..."
ADMIN_SCOPE = "memory:admin"
"""Reads and wipes any session; never granted to agents (the dev config gives it to the grpcurl client)."""

T = TypeVar("T")


def compress(memories: list[tuple[int, str]], max_chars: int) -> str:
    """Render memories as "Turn <n>: <text>" lines, each on one line and cut to ``max_chars`` plus "...".

    A stored newline would otherwise let one message forge further "Turn 99:" lines.
    """
    lines = []
    for turn, message in memories:
        flat = " ".join(message.split())
        text = flat if len(flat) <= max_chars else flat[:max_chars] + TRUNCATION_MARK
        lines.append(f"Turn {turn}: {text}")
    return "\n".join(lines)


class StoreCollector(Collector):
    """``heist_memory_entries``, ``_bytes`` and ``_sessions``: read from the store at scrape time, free per call."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        """Yield the gauges (none when the store cannot be read, e.g. Redis is down: no value beats a wrong one)."""
        totals = self._store.totals()
        if totals is None:
            return
        memories, size, sessions = totals
        yield GaugeMetricFamily("heist_memory_entries", "Memories held, over every session.", value=memories)
        yield GaugeMetricFamily("heist_memory_bytes", "Bytes of memories held, over every session.", value=size)
        yield GaugeMetricFamily("heist_memory_sessions", "Sessions with memories.", value=sessions)


class MemoryServicer(memory_pb2_grpc.MemoryServiceServicer):
    """Serves heist.memory.v1.MemoryService."""

    def __init__(self, limits: Limits, store: MemoryStore) -> None:
        self._limits = limits
        self._store = store
        self.quota_refusals = Counter(
            "heist_memory_quota_refusals", "StoreMemory calls refused by a quota (RESOURCE_EXHAUSTED).", registry=None
        )
        self.collectors = (StoreCollector(store), self.quota_refusals)

    async def _require_session(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """Return the call's session, which the caller's token must be bound to (or carry ``memory:admin``)."""
        session = session_id(context)
        if not session:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "missing 'x-session-id' call metadata")
        caller = CALLER.get()
        if caller is None or (caller.session_id != session and ADMIN_SCOPE not in caller.scopes):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "memory is per session: use a token issued with this call's 'x-session-id' "
                f"(or one with the {ADMIN_SCOPE!r} scope)",
            )
        return session

    @staticmethod
    async def _reach(work: Awaitable[T], context: grpc.aio.ServicerContext[Any, Any]) -> T:
        """Await a store call; an unreachable store is UNAVAILABLE with its reason (retryable, not INTERNAL)."""
        try:
            return await work
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise  # abort raises; this line only tells the type checker

    async def _check_agent(self, agent_name: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if not agent_name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "agent_name is required")
        if len(agent_name) > self._limits.max_agent_name_chars:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"agent_name is longer than {self._limits.max_agent_name_chars} characters",
            )

    async def StoreMemory(
        self, request: memory_pb2.StoreMemoryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> memory_pb2.StoreMemoryResponse:
        """Store one turn's message (same turn again replaces it)."""
        session = await self._require_session(context)
        await self._check_agent(request.agent_name, context)
        if request.turn_id < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"turn_id must be >= 0, got {request.turn_id}")
        message = request.message
        limit = self._limits.max_message_bytes
        size = len(message.encode("utf-8", "surrogatepass"))
        if size > limit:
            self.quota_refusals.inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"message is larger than the limit of {limit} bytes"
            )
        try:
            count = await self._reach(
                self._store.store(session, request.agent_name, request.turn_id, message, size), context
            )
        except QuotaError as exc:
            self.quota_refusals.inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        return memory_pb2.StoreMemoryResponse(agent_memory_count=count)

    async def GetCompressedMemory(
        self, request: memory_pb2.GetCompressedMemoryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> memory_pb2.GetCompressedMemoryResponse:
        """Return the agent's latest memories as one truncated summary."""
        session = await self._require_session(context)
        await self._check_agent(request.agent_name, context)
        if request.recent_count < 0 or request.max_chars < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "recent_count and max_chars must be >= 0")
        limits = self._limits
        if request.recent_count > limits.max_recent_count or request.max_chars > limits.max_chars_per_memory:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"recent_count may be at most {limits.max_recent_count} and max_chars at most "
                f"{limits.max_chars_per_memory}",
            )
        count = request.recent_count or self._limits.default_recent_count
        max_chars = request.max_chars or self._limits.default_max_chars
        memories, total = await self._reach(self._store.recent(session, request.agent_name, count), context)
        return memory_pb2.GetCompressedMemoryResponse(
            summary=compress(memories, max_chars), included_count=len(memories), total_count=total
        )

    async def GetStats(
        self, request: memory_pb2.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> memory_pb2.GetStatsResponse:
        """Return global and calling-session counts."""
        stats = await self._reach(self._store.stats(await self._require_session(context)), context)
        return memory_pb2.GetStatsResponse(**stats._asdict())

    async def ClearMemories(
        self, request: memory_pb2.ClearMemoriesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> memory_pb2.ClearMemoriesResponse:
        """Forget the calling session, or every session when ``all_sessions`` is set (``memory:admin`` only)."""
        if request.all_sessions:
            caller = CALLER.get()
            if caller is None or ADMIN_SCOPE not in caller.scopes:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED, f"clearing every session needs the {ADMIN_SCOPE!r} scope"
                )
            return memory_pb2.ClearMemoriesResponse(cleared=await self._reach(self._store.clear_all(), context))
        session = await self._require_session(context)
        cleared = await self._reach(self._store.clear_session(session), context)
        return memory_pb2.ClearMemoriesResponse(cleared=cleared)


def open_store(url: str | None, limits: Limits) -> MemoryStore:
    """Open the store ``services.memory.store`` names: None for this process, ``redis://host:port/db`` for Redis."""
    if url is None:
        return InProcessStore(limits)
    from servers.memory.redis_store import RedisStore  # the client library only when Redis is configured

    return RedisStore(url, limits)


def store_probe(store: MemoryStore) -> Callable[[], Awaitable[str | None]]:
    """Return the server's health probe: None while the store answers, else why it does not."""

    async def probe() -> str | None:
        try:
            await store.ping()
        except StoreUnavailable as exc:
            return str(exc)
        return None

    return probe


def service_definition(config: HeistConfig, limits: Limits) -> ServiceDefinition:
    """Build the memory servicer on the configured store (``services.memory.store``; unset: in this process)."""
    url = config.service("memory").store
    store = open_store(url, limits)
    servicer = MemoryServicer(limits, store)
    return ServiceDefinition(
        "memory",
        servicer,
        on_stop=store.close,
        collectors=servicer.collectors,
        health_probe=HealthProbe(store_probe(store), PROBE_INTERVAL_S) if url is not None else None,
    )

