"""The memory store in this process: each call costs microseconds, and a restart forgets (the audit rebuilds).

Enforces the same quotas as the Redis store (``servers.memory.redis_store``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from servers.memory.limits import Limits
from servers.memory.store import SWEEP_INTERVAL_S, QuotaError, StoreStats


class _Session:
    """One session's memories and what they weigh."""

    __slots__ = ("agents", "bytes", "count", "used_at")

    def __init__(self, now: float) -> None:
        self.agents: dict[str, dict[int, str]] = {}
        self.bytes = 0
        self.count = 0
        self.used_at = now


class InProcessStore:
    """Messages keyed by session -> agent -> turn, within quotas, with running totals for GetStats.

    All calls run on one event loop and never await between reading and
    updating, so they need no lock.
    """

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = limits
        self._clock = clock
        self._sessions: dict[str, _Session] = {}
        self._sessions_per_agent: Counter[str] = Counter()
        self._total = 0
        self._total_bytes = 0
        self._swept_at = clock()

    def _session(self, session: str, create: bool) -> _Session | None:
        now = self._clock()
        if now - self._swept_at >= SWEEP_INTERVAL_S:
            self._expire(now)
        entry = self._sessions.get(session)
        if entry is None and create:
            if len(self._sessions) >= self._limits.max_sessions:
                raise QuotaError(f"memory holds the maximum of {self._limits.max_sessions} sessions")
            entry = self._sessions[session] = _Session(now)
        if entry is not None:
            entry.used_at = now
        return entry

    def _expire(self, now: float) -> None:
        self._swept_at = now
        idle = [name for name, entry in self._sessions.items() if now - entry.used_at > self._limits.idle_session_ttl_s]
        for name in idle:
            self._forget(name)

    async def store(self, session: str, agent: str, turn: int, message: str, size: int) -> int:
        """Store (or replace) one turn's message of ``size`` bytes; return the agent's count in the session."""
        entry = self._session(session, create=True)
        assert entry is not None
        turns = entry.agents.get(agent, {})
        replaced = turns.get(turn)
        delta = size - (len(replaced.encode("utf-8", "surrogatepass")) if replaced is not None else 0)
        limits = self._limits
        if replaced is None and entry.count >= limits.max_memories_per_session:
            raise QuotaError(f"session holds the maximum of {limits.max_memories_per_session} memories")
        if entry.bytes + delta > limits.max_session_bytes:
            raise QuotaError(f"session would exceed its {limits.max_session_bytes} bytes of memory")
        if self._total_bytes + delta > limits.max_total_bytes:
            raise QuotaError(f"memory service would exceed its {limits.max_total_bytes} bytes in total")
        if agent not in entry.agents:
            entry.agents[agent] = turns
            self._sessions_per_agent[agent] += 1
        if replaced is None:
            entry.count += 1
            self._total += 1
        turns[turn] = message
        entry.bytes += delta
        self._total_bytes += delta
        return len(turns)

    async def recent(self, session: str, agent: str, count: int) -> tuple[list[tuple[int, str]], int]:
        """Return the agent's last ``count`` (turn, message) pairs in turn order, and its total."""
        entry = self._session(session, create=False)
        turns = entry.agents.get(agent, {}) if entry is not None else {}
        latest = sorted(turns)[-count:]
        return [(turn, turns[turn]) for turn in latest], len(turns)

    async def stats(self, session: str) -> StoreStats:
        """Return global counts plus those of ``session``."""
        entry = self._session(session, create=False)
        agents = entry.agents if entry is not None else {}
        return StoreStats(
            agents=len(self._sessions_per_agent),
            sessions=len(self._sessions),
            memories=self._total,
            session_memories=entry.count if entry is not None else 0,
            session_agents=len(agents),
        )

    async def clear_session(self, session: str) -> int:
        """Forget one session; return how many memories were removed."""
        return self._forget(session)

    def _forget(self, session: str) -> int:
        entry = self._sessions.pop(session, None)
        if entry is None:
            return 0
        for agent in entry.agents:
            self._sessions_per_agent[agent] -= 1
            if self._sessions_per_agent[agent] <= 0:
                del self._sessions_per_agent[agent]
        self._total -= entry.count
        self._total_bytes -= entry.bytes
        return entry.count

    async def clear_all(self) -> int:
        """Forget every session; return how many memories were removed."""
        removed = self._total
        self._sessions.clear()
        self._sessions_per_agent.clear()
        self._total = 0
        self._total_bytes = 0
        return removed

    async def close(self) -> None:
        """Nothing to release."""

    async def ping(self) -> None:
        """Return at once: a store in this process is reachable while the process runs."""

    def totals(self) -> tuple[int, int, int] | None:
        """Return (memories, bytes, sessions), read without a lock (a scrape may be one call behind)."""
        return self._total, self._total_bytes, len(self._sessions)
