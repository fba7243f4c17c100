"""What the memory servicer needs from a store, whichever it has: the protocol, its stats and its errors."""

from __future__ import annotations

from typing import NamedTuple, Protocol

SWEEP_INTERVAL_S = 1.0
"""Idle sessions are looked for at most this often."""
PROBE_INTERVAL_S = 1.0
"""How often the server asks its store whether it is reachable (grpc.health.v1 follows the answer)."""
PROBE_TIMEOUT_S = 0.5
"""A store that does not answer a probe within this is unreachable (a hung Redis, not only a dead one)."""


class StoreStats(NamedTuple):
    """Global counts plus those of one session (the fields of ``GetStatsResponse``)."""

    agents: int
    sessions: int
    memories: int
    session_memories: int
    session_agents: int


class MemoryStore(Protocol):
    """What the memory servicer needs from a store."""

    async def store(self, session: str, agent: str, turn: int, message: str, size: int) -> int:
        """Store (or replace) one turn's message of ``size`` bytes; return the agent's count. QuotaError if full."""

    async def recent(self, session: str, agent: str, count: int) -> tuple[list[tuple[int, str]], int]:
        """Return the agent's last ``count`` (turn, message) pairs in turn order, and its total."""

    async def stats(self, session: str) -> StoreStats:
        """Return global counts plus those of ``session``."""

    async def clear_session(self, session: str) -> int:
        """Forget one session; return how many memories were removed."""

    async def clear_all(self) -> int:
        """Forget every session; return how many memories were removed."""

    async def close(self) -> None:
        """Release connections."""

    async def ping(self) -> None:
        """Return if the store answers now; StoreUnavailable (saying why) if it does not."""

    def totals(self) -> tuple[int, int, int] | None:
        """Return (memories, bytes, sessions) over every session, for metrics; None if they cannot be read now.

        Synchronous on purpose: it is called on the metrics endpoint's thread, never on the event loop.
        """


class QuotaError(Exception):
    """Storing would exceed a quota; the message says which."""


class StoreUnavailable(Exception):
    """The store cannot be reached now (Redis down or hung); the message says where and why. Worth retrying."""
