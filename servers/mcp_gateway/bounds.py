"""What one MCP client may ask of the gateway: a call rate and calls in flight, per OAuth client and in all.

Why here and not only in the tool services: the tool services see one caller (the gateway), so their
per-caller fairness cannot tell the gateway's clients apart; the gateway has to.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float
    in_flight: int = 0


class ClientBounds:
    """A token bucket (``rate`` calls/s, ``burst`` deep) and an in-flight count per client, plus a global cap.

    At most ``max_clients`` clients are remembered (the least recently seen idle one is forgotten first),
    so the bookkeeping stays bounded whatever tokens callers bring.
    """

    def __init__(
        self,
        *,
        rate: float,
        burst: int,
        max_in_flight: int,
        max_in_flight_per_client: int,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate
        self._burst = burst
        self._max_in_flight = max_in_flight
        self._per_client = max_in_flight_per_client
        self._max_clients = max_clients
        self._clock = clock
        self._clients: OrderedDict[str, _Bucket] = OrderedDict()
        self.in_flight = 0

    @property
    def remembered(self) -> int:
        """How many clients' buckets are kept."""
        return len(self._clients)

    def acquire(self, client: str) -> str | None:
        """Take one call for ``client``; None if it may go ahead, else why not (then nothing was taken)."""
        now = self._clock()
        bucket = self._clients.get(client)
        if bucket is None:
            bucket = _Bucket(float(self._burst), now)
            self._clients[client] = bucket
            self._forget_idle()
        self._clients.move_to_end(client)
        bucket.tokens = min(float(self._burst), bucket.tokens + (now - bucket.updated) * self._rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            wait = (1.0 - bucket.tokens) / self._rate
            return f"rate limit: at most {self._rate:g} calls per second per client; retry in {wait:.2f} s"
        if bucket.in_flight >= self._per_client:
            return f"too many calls in flight for this client (at most {self._per_client})"
        if self.in_flight >= self._max_in_flight:
            return f"the gateway has {self._max_in_flight} calls in flight, its limit; retry shortly"
        bucket.tokens -= 1.0
        bucket.in_flight += 1
        self.in_flight += 1
        return None

    def release(self, client: str) -> None:
        """End a call ``acquire`` let through."""
        self.in_flight -= 1
        bucket = self._clients.get(client)
        if bucket is not None:
            bucket.in_flight -= 1

    def _forget_idle(self) -> None:
        while len(self._clients) > self._max_clients:
            for name, bucket in self._clients.items():
                if bucket.in_flight == 0:
                    del self._clients[name]
                    break
            else:
                return
