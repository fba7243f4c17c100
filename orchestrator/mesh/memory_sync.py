"""The memory service as a cache of the audit: fetch an agent's notes, notice losses, rebuild.

The audit database is the source of truth; the memory service only makes each
turn's context cheap. So its failures never fail a turn: a fetch that fails
returns no notes, and a service that was down or silently lost data (a restart)
gets the session's messages re-stored from the audit.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from heist_common.audit import AuditStore, EventRow
from orchestrator.mesh.clients import Metadata, ServiceCallError, ServiceClients
from orchestrator.tracing import elapsed_ms

__all__ = ["MemoryFetch", "MemorySync"]


@dataclass(slots=True)
class MemoryFetch:
    """A compressed-memory lookup's outcome; never raises, so it can be prefetched as a task."""

    summary: str = ""
    error: ServiceCallError | None = None


class MemorySync:
    """Keeps the memory service consistent with the audit, its source of truth.

    The memory service is a cache: when it was down (a call failed) or silently
    lost data (a restart: it reports fewer memories than were written), the
    session's messages are re-stored from the audit database. StoreMemory is
    idempotent per (agent, turn), so re-storing never duplicates.
    """

    def __init__(self, clients: ServiceClients, audit: AuditStore, session_id: str, metadata: Metadata) -> None:
        self._clients = clients
        self._audit = audit
        self._session_id = session_id
        self._metadata = metadata
        self.degraded = False
        self.messages_written = 0
        self.per_agent: dict[str, int] = {}
        self.rebuilds = 0
        self._failed_rebuilds = 0
        self._next_rebuild_turn = 0

    def record_written(self, agent_name: str) -> None:
        """Count a message that reached the audit database."""
        self.messages_written += 1
        self.per_agent[agent_name] = self.per_agent.get(agent_name, 0) + 1

    async def after_store(self, agent_name: str, agent_memory_count: int, turn_id: int) -> list[EventRow]:
        """Rebuild after a successful StoreMemory if the service lost anything."""
        lost = agent_memory_count < self.per_agent.get(agent_name, 0)
        if not (lost or self.degraded) or turn_id < self._next_rebuild_turn:
            return []
        try:
            held = await self._clients.memory.session_memories(self._metadata)
        except ServiceCallError as exc:
            self.degraded = True
            return [exc.to_event(turn_id, agent_name)]
        if held >= self.messages_written and not lost:
            self.degraded = False
            return []
        return await self.rebuild(turn_id)

    async def rebuild(self, turn_id: int | None = None, *, fresh: bool = False) -> list[EventRow]:
        """Re-store every message of the session from the audit database.

        ``fresh`` forgets the session's memories first, so the service holds
        exactly the audit afterwards: a resumed session's killed process may have
        stored a turn whose audit write never committed.
        """
        start = time.perf_counter()
        rows = await self._audit.agent_messages(self._session_id)
        memory = self._clients.memory
        if fresh:
            try:
                await memory.clear_session(self._metadata)
            except ServiceCallError as exc:
                self.degraded = True
                return [exc.to_event(turn_id)]
        outcomes = await asyncio.gather(
            *(memory.store(agent, turn, text, self._metadata) for agent, turn, text in rows), return_exceptions=True
        )
        failures = [o for o in outcomes if isinstance(o, ServiceCallError)]
        unexpected = [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, ServiceCallError)]
        if unexpected:
            raise unexpected[0]
        latency = elapsed_ms(start)
        if failures:
            # Back off (2, 4, 8, 16 turns) so a service that keeps refusing is not sent the whole session every turn.
            self.degraded = True
            self._failed_rebuilds += 1
            self._next_rebuild_turn = (turn_id or 0) + min(2**self._failed_rebuilds, 16)
            return [failures[0].to_event(turn_id)]
        self.degraded = False
        self._failed_rebuilds = 0
        self.rebuilds += 1
        return [
            EventRow(
                service="memory",
                operation="rebuild",
                status_code="OK",
                detail=f"re-stored {len(rows)} messages from the audit database",
                latency_ms=round(latency, 3),
                turn_id=turn_id,
            )
        ]
