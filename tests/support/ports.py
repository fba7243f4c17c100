"""Free loopback ports for tests, so nothing collides with a running `make serve` (18051-18055, 1234)."""

from __future__ import annotations

import socket


def free_ports(count: int) -> list[int]:
    """Ports the kernel hands out as free right now (held open together, so they are distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def free_port() -> int:
    """One free port."""
    return free_ports(1)[0]


def listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:port."""
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0
