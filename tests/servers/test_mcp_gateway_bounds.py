"""The gateway's per-client bounds (``servers.mcp_gateway.bounds``) on a clock the test moves."""

from __future__ import annotations

from servers.mcp_gateway.bounds import ClientBounds


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def bounds(clock: Clock, **overrides: int | float) -> ClientBounds:
    settings: dict[str, int | float] = {"rate": 2.0, "burst": 3, "max_in_flight": 10, "max_in_flight_per_client": 10}
    settings.update(overrides)
    return ClientBounds(clock=clock, **settings)  # type: ignore[arg-type]


def test_a_client_gets_its_burst_then_its_rate() -> None:
    clock = Clock()
    limiter = bounds(clock)
    for _ in range(3):
        assert limiter.acquire("a") is None
        limiter.release("a")
    refused = limiter.acquire("a")
    assert refused is not None and refused.startswith("rate limit: at most 2 calls per second")
    assert limiter.acquire("b") is None, "another client has its own bucket"
    clock.now += 0.5  # one call's worth at 2 calls/s
    assert limiter.acquire("a") is None
    assert limiter.acquire("a") is not None


def test_calls_in_flight_are_bounded_per_client_and_in_all() -> None:
    clock = Clock()
    limiter = bounds(clock, burst=100, max_in_flight=3, max_in_flight_per_client=2)
    assert limiter.acquire("a") is None and limiter.acquire("a") is None
    assert "for this client (at most 2)" in (limiter.acquire("a") or "")
    assert limiter.acquire("b") is None
    assert "3 calls in flight" in (limiter.acquire("c") or "")
    limiter.release("a")
    assert limiter.acquire("c") is None
    assert limiter.in_flight == 3


def test_a_refused_call_takes_nothing() -> None:
    clock = Clock()
    limiter = bounds(clock, burst=1, max_in_flight_per_client=1)
    assert limiter.acquire("a") is None
    assert limiter.acquire("a") is not None
    limiter.release("a")
    assert limiter.in_flight == 0


def test_remembered_clients_are_bounded() -> None:
    clock = Clock()
    limiter = bounds(clock, burst=1, max_clients=2)
    for name in ("a", "b", "c"):
        assert limiter.acquire(name) is None
        limiter.release(name)
    assert limiter.remembered == 2
    assert limiter.acquire("a") is None, "a forgotten client starts with a full bucket"
