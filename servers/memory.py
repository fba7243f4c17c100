"""Memory service: per-session, per-agent recent messages as compact context.

Why in-process dicts: this is a cache of the orchestrator's audit database (the
source of truth) and sits on every agent turn, so each call must cost
microseconds. All handlers run on one event loop and never await between
reading and updating the store, so concurrent calls need no lock.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import grpc
from heist.memory.v1 import memory_pb2, memory_pb2_grpc
from pydantic import Field

from heist_common.config import HeistConfig
from servers import lifecycle
from servers.lifecycle import ServiceDefinition
from servers.middleware import CALLER, session_id

TRUNCATION_MARK = "..."
ADMIN_SCOPE = "memory:admin"
"""Reads and wipes any session; never granted to agents (the dev config gives it to the grpcurl client)."""


class Limits(lifecycle.Limits):
    """``services.memory.limits``: size bounds and defaults of the memory service."""

    max_message_bytes: int = Field(64 * 1024, ge=1, strict=True)
    default_recent_count: int = Field(5, ge=1, strict=True)
    default_max_chars: int = Field(100, ge=1, strict=True)
    max_agent_name_chars: int = Field(128, ge=1, strict=True)


class MemoryStore:
    """Messages keyed by session -> agent -> turn, with running totals for GetStats."""

    def __init__(self) -> None:
        self._sessions: dict[str, dict[str, dict[int, str]]] = {}
        self._sessions_per_agent: Counter[str] = Counter()
        self._total = 0

    def store(self, session: str, agent: str, turn: int, message: str) -> int:
        """Store (or replace) one turn's message; return the agent's memory count in the session."""
        agents = self._sessions.get(session)
        if agents is None:
            agents = self._sessions[session] = {}
        turns = agents.get(agent)
        if turns is None:
            turns = agents[agent] = {}
            self._sessions_per_agent[agent] += 1
        if turn not in turns:
            self._total += 1
        turns[turn] = message
        return len(turns)

    def recent(self, session: str, agent: str, count: int) -> tuple[list[tuple[int, str]], int]:
        """Return the agent's last ``count`` (turn, message) pairs in turn order, and its total."""
        turns = self._sessions.get(session, {}).get(agent, {})
        latest = sorted(turns)[-count:]
        return [(turn, turns[turn]) for turn in latest], len(turns)

    def stats(self, session: str) -> memory_pb2.GetStatsResponse:
        """Return global counts plus those of ``session``."""
        agents = self._sessions.get(session, {})
        return memory_pb2.GetStatsResponse(
            agents=len(self._sessions_per_agent),
            sessions=len(self._sessions),
            memories=self._total,
            session_memories=sum(len(turns) for turns in agents.values()),
            session_agents=len(agents),
        )

    def clear_session(self, session: str) -> int:
        """Forget one session; return how many memories were removed."""
        agents = self._sessions.pop(session, {})
        removed = 0
        for agent, turns in agents.items():
            removed += len(turns)
            self._sessions_per_agent[agent] -= 1
            if self._sessions_per_agent[agent] <= 0:
                del self._sessions_per_agent[agent]
        self._total -= removed
        return removed

    def clear_all(self) -> int:
        """Forget every session; return how many memories were removed."""
        removed = self._total
        self._sessions.clear()
        self._sessions_per_agent.clear()
        self._total = 0
        return removed


def compress(memories: list[tuple[int, str]], max_chars: int) -> str:
    """Render memories as "Turn <n>: <text>" lines, each text cut to ``max_chars`` plus "..."."""
    lines = []
    for turn, message in memories:
        text = message if len(message) <= max_chars else message[:max_chars] + TRUNCATION_MARK
        lines.append(f"Turn {turn}: {text}")
    return "\n".join(lines)


class MemoryServicer(memory_pb2_grpc.MemoryServiceServicer):
    """Serves heist.memory.v1.MemoryService."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._store = MemoryStore()

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
        # Cheap length test first: a str of n characters encodes to at most 4n bytes.
        if len(message) * 4 > limit and len(message.encode("utf-8", "surrogatepass")) > limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"message is larger than the limit of {limit} bytes"
            )
        count = self._store.store(session, request.agent_name, request.turn_id, message)
        return memory_pb2.StoreMemoryResponse(agent_memory_count=count)

    async def GetCompressedMemory(
        self, request: memory_pb2.GetCompressedMemoryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> memory_pb2.GetCompressedMemoryResponse:
        """Return the agent's latest memories as one truncated summary."""
        session = await self._require_session(context)
        await self._check_agent(request.agent_name, context)
        if request.recent_count < 0 or request.max_chars < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "recent_count and max_chars must be >= 0")
        count = request.recent_count or self._limits.default_recent_count
        max_chars = request.max_chars or self._limits.default_max_chars
        memories, total = self._store.recent(session, request.agent_name, count)
        return memory_pb2.GetCompressedMemoryResponse(
            summary=compress(memories, max_chars), included_count=len(memories), total_count=total
        )

    async def GetStats(
        self, request: memory_pb2.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> memory_pb2.GetStatsResponse:
        """Return global and calling-session counts."""
        return self._store.stats(await self._require_session(context))

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
            return memory_pb2.ClearMemoriesResponse(cleared=self._store.clear_all())
        session = await self._require_session(context)
        return memory_pb2.ClearMemoriesResponse(cleared=self._store.clear_session(session))


def service_definition(config: HeistConfig, limits: Limits) -> ServiceDefinition:
    """Build the memory servicer."""
    return ServiceDefinition("memory", MemoryServicer(limits))


if __name__ == "__main__":
    raise SystemExit(lifecycle.main(__spec__))
