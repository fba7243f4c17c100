"""The memory store in Redis: no session state in the process, so replicas share it and restarts lose nothing.

Every change is one Lua script, so a quota check and the write it allows are
atomic even with several memory replicas writing to one Redis. Keys carry the
session (``heist:mem:s:<session>:...``); a sorted set of sessions by last use
drives the idle-session expiry, and every session key also gets a Redis TTL of
twice the idle time as a backstop when no memory service is running.

When Redis cannot be reached every call raises ``StoreUnavailable`` (the
servicer answers UNAVAILABLE, which callers retry) after at most one retry on
a fresh connection, so an outage costs a caller one refused call, not a wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis as redis_sync
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from heist_common.config import redact_url
from servers.memory.limits import Limits
from servers.memory.store import PROBE_TIMEOUT_S, SWEEP_INTERVAL_S, QuotaError, StoreStats, StoreUnavailable

PREFIX = "heist:mem"
SESSIONS = f"{PREFIX}:sessions"
"""Sorted set: session -> time of last use."""
TOTALS = f"{PREFIX}:totals"
"""Hash: memories, bytes (over every session)."""
AGENTS = f"{PREFIX}:agents"
"""Hash: agent -> number of sessions it has memories in."""

STORE = """
local turns, meta, agents_of_session = KEYS[1], KEYS[2], KEYS[3]
local turn, message, size, now, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local max_count, max_session_bytes = tonumber(ARGV[6]), tonumber(ARGV[7])
local max_sessions, max_total_bytes = tonumber(ARGV[8]), tonumber(ARGV[9])
local session, agent = ARGV[10], ARGV[11]
local old = redis.call('HGET', turns, turn)
local delta = size
if old then delta = size - string.len(old) end
if not redis.call('ZSCORE', KEYS[4], session) and redis.call('ZCARD', KEYS[4]) >= max_sessions then
  return redis.error_reply('QUOTA memory holds the maximum of ' .. max_sessions .. ' sessions')
end
local count = tonumber(redis.call('HGET', meta, 'count') or '0')
local bytes = tonumber(redis.call('HGET', meta, 'bytes') or '0')
if not old and count >= max_count then
  return redis.error_reply('QUOTA session holds the maximum of ' .. max_count .. ' memories')
end
if bytes + delta > max_session_bytes then
  return redis.error_reply('QUOTA session would exceed its ' .. max_session_bytes .. ' bytes of memory')
end
if tonumber(redis.call('HGET', KEYS[5], 'bytes') or '0') + delta > max_total_bytes then
  return redis.error_reply('QUOTA memory service would exceed its ' .. max_total_bytes .. ' bytes in total')
end
if redis.call('SADD', agents_of_session, agent) == 1 then redis.call('HINCRBY', KEYS[6], agent, 1) end
redis.call('HSET', turns, turn, message)
if not old then
  redis.call('HINCRBY', meta, 'count', 1)
  redis.call('HINCRBY', KEYS[5], 'memories', 1)
end
redis.call('HINCRBY', meta, 'bytes', delta)
redis.call('HINCRBY', KEYS[5], 'bytes', delta)
redis.call('ZADD', KEYS[4], now, session)
for _, key in ipairs({turns, meta, agents_of_session}) do redis.call('EXPIRE', key, ttl) end
return redis.call('HLEN', turns)
"""

FORGET = """
local session, prefix = ARGV[1], ARGV[2]
local base = prefix .. ':s:' .. session
local removed = tonumber(redis.call('HGET', base .. ':meta', 'count') or '0')
local bytes = tonumber(redis.call('HGET', base .. ':meta', 'bytes') or '0')
for _, agent in ipairs(redis.call('SMEMBERS', base .. ':agents')) do
  redis.call('DEL', base .. ':a:' .. agent)
  if redis.call('HINCRBY', KEYS[2], agent, -1) <= 0 then redis.call('HDEL', KEYS[2], agent) end
end
redis.call('DEL', base .. ':meta', base .. ':agents')
redis.call('ZREM', KEYS[1], session)
redis.call('HINCRBY', KEYS[3], 'memories', -removed)
redis.call('HINCRBY', KEYS[3], 'bytes', -bytes)
return removed
"""


RETRIES = 1
"""A call is retried once on a new connection: enough for a pooled connection Redis closed when it restarted."""
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)


def _session_keys(session: str, agent: str = "") -> tuple[str, str, str]:
    base = f"{PREFIX}:s:{session}"
    return f"{base}:a:{agent}", f"{base}:meta", f"{base}:agents"


class RedisStore:
    """The memory store on one Redis database (``redis://host:port/db``)."""

    def __init__(self, url: str, limits: Limits, clock: Any = time.time) -> None:
        retry = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.05), retries=RETRIES)
        self._client = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=2.0, socket_connect_timeout=2.0, retry=retry
        )
        self._url = url
        self._where = redact_url(url)
        self._metrics_client: redis_sync.Redis | None = None
        self._limits = limits
        self._clock = clock
        self._store = self._client.register_script(STORE)
        self._forget = self._client.register_script(FORGET)
        self._swept_at = 0.0

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        """Turn "cannot reach Redis" into StoreUnavailable, saying where and why (no traceback for an outage)."""
        try:
            yield
        except _UNREACHABLE as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise StoreUnavailable(f"the memory store (Redis at {self._where}) is unreachable: {reason}") from None

    async def ping(self) -> None:
        """Return if Redis answers PING within ``PROBE_TIMEOUT_S``; StoreUnavailable otherwise."""
        with self._reachable():
            try:
                await asyncio.wait_for(self._client.ping(), PROBE_TIMEOUT_S)
            except TimeoutError:
                raise RedisTimeoutError(f"no answer to PING within {PROBE_TIMEOUT_S:g} s") from None

    async def _sweep(self) -> None:
        """Forget sessions idle longer than ``idle_session_ttl_s`` (at most once a second per replica)."""
        now = self._clock()
        if now - self._swept_at < SWEEP_INTERVAL_S:
            return
        self._swept_at = now
        for session in await self._client.zrangebyscore(SESSIONS, "-inf", now - self._limits.idle_session_ttl_s):
            await self._forget(keys=[SESSIONS, AGENTS, TOTALS], args=[str(session), PREFIX])

    async def _touch(self, session: str) -> None:
        if await self._client.zscore(SESSIONS, session) is not None:
            await self._client.zadd(SESSIONS, {session: self._clock()}, xx=True)

    async def store(self, session: str, agent: str, turn: int, message: str, size: int) -> int:
        """Store (or replace) one turn's message; QuotaError when a quota would be exceeded."""
        with self._reachable():
            return await self._store_one(session, agent, turn, message, size)

    async def _store_one(self, session: str, agent: str, turn: int, message: str, size: int) -> int:
        await self._sweep()
        limits = self._limits
        turns, meta, agents_of_session = _session_keys(session, agent)
        ttl = int(limits.idle_session_ttl_s * 2) + 1
        args = [
            turn, message, size, self._clock(), ttl,
            limits.max_memories_per_session, limits.max_session_bytes, limits.max_sessions, limits.max_total_bytes,
            session, agent,
        ]  # fmt: skip
        try:
            count = await self._store(keys=[turns, meta, agents_of_session, SESSIONS, TOTALS, AGENTS], args=args)
        except ResponseError as exc:
            text = str(exc)
            if text.startswith("QUOTA "):
                raise QuotaError(text.removeprefix("QUOTA ")) from None
            raise
        return int(count)

    async def recent(self, session: str, agent: str, count: int) -> tuple[list[tuple[int, str]], int]:
        """Return the agent's last ``count`` (turn, message) pairs in turn order, and its total."""
        with self._reachable():
            await self._sweep()
            await self._touch(session)
            stored = await self._client.hgetall(_session_keys(session, agent)[0])  # decode_responses: str values
        turns = sorted((int(turn), str(message)) for turn, message in stored.items())
        return turns[-count:], len(turns)

    async def stats(self, session: str) -> StoreStats:
        """Return global counts plus those of ``session``."""
        _, meta, agents_of_session = _session_keys(session)
        with self._reachable():
            await self._sweep()
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hlen(AGENTS)
                pipe.zcard(SESSIONS)
                pipe.hget(TOTALS, "memories")
                pipe.hget(meta, "count")
                pipe.scard(agents_of_session)
                agents, sessions, memories, session_memories, session_agents = await pipe.execute()
        return StoreStats(
            agents=int(agents),
            sessions=int(sessions),
            memories=int(memories or 0),
            session_memories=int(session_memories or 0),
            session_agents=int(session_agents),
        )

    async def clear_session(self, session: str) -> int:
        """Forget one session; return how many memories were removed."""
        with self._reachable():
            return int(await self._forget(keys=[SESSIONS, AGENTS, TOTALS], args=[session, PREFIX]))

    async def clear_all(self) -> int:
        """Forget every session; return how many memories were removed."""
        removed = 0
        with self._reachable():
            for session in await self._client.zrange(SESSIONS, 0, -1):
                removed += int(await self._forget(keys=[SESSIONS, AGENTS, TOTALS], args=[str(session), PREFIX]))
        return removed

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()
        if self._metrics_client is not None:
            self._metrics_client.close()

    def totals(self) -> tuple[int, int, int] | None:
        """Return (memories, bytes, sessions) of the whole Redis store (every replica reports the same)."""
        if self._metrics_client is None:  # a blocking client of its own: this runs on the metrics thread
            self._metrics_client = redis_sync.Redis.from_url(
                self._url, decode_responses=True, socket_timeout=1.0, socket_connect_timeout=1.0
            )
        try:
            with self._metrics_client.pipeline(transaction=False) as pipe:
                pipe.hget(TOTALS, "memories")
                pipe.hget(TOTALS, "bytes")
                pipe.zcard(SESSIONS)
                memories, size, sessions = pipe.execute()
        except redis_sync.RedisError:
            return None
        return int(memories or 0), int(size or 0), int(sessions)
