"""Every server's side doors under a hostile local client: the metrics port and methods that do not exist.

Against a real calculator process with a metrics port (any server has both).
A flood of half-open connections on the metrics port must cost the server a
bounded number of threads and descriptors and never reach its gRPC port; calls
to unknown methods must be counted under one bounded label and logged. Every
loop is bounded in count and time; measurements are printed (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from urllib.parse import urlsplit

import grpc
import pytest
from heist.calculator.v1 import calculator_pb2, calculator_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.abuse.harness import RunningService
from tests.support.access_log import access_entries
from tests.support.channels import channel

pytestmark = pytest.mark.abuse

FLOOD_SOCKETS = 400
FLOOD_BOUND_S = 20.0
"""Opening the flood stops after this long whatever happens."""
DESCRIPTOR_LIMIT = 128
"""RLIMIT_NOFILE the server gets for the flood: the flood alone would need more."""
EXTRA_THREADS = 4
"""Threads the server may add during the flood (before: one per connection)."""
GRPC_DEADLINE_S = 2.0
CALCULATOR = "/heist.calculator.v1.CalculatorService"
Series = tuple[str, tuple[tuple[str, str], ...]]
"""A sample's name and its sorted labels."""


@pytest.fixture(scope="module")
def calc(service_factory: Callable[..., RunningService]) -> RunningService:
    return service_factory("calculator", "calculator:use", {}, metrics=True)


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def scrape(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        assert response.status == 200
        return str(response.read().decode())


def scrape_within(url: str, seconds: float) -> str:
    """The first answer of /metrics within ``seconds`` (tries every 0.2 s); AssertionError if none came."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return scrape(url, timeout_s=max(0.5, deadline - time.monotonic()))
        except (OSError, urllib.error.URLError) as exc:
            if time.monotonic() >= deadline:
                raise AssertionError(f"/metrics did not answer within {seconds} s: {exc}") from None
        time.sleep(0.2)


def samples(url: str) -> dict[Series, float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(scrape(url))
        for sample in family.samples
    }


def evaluate(calc: RunningService, target: grpc.Channel) -> float:
    """Seconds one Evaluate takes on ``target`` (fails the test if it does not answer within its deadline)."""
    started = time.monotonic()
    response = calculator_pb2_grpc.CalculatorServiceStub(target).Evaluate(
        calculator_pb2.EvaluateRequest(expression="6 * 7"), metadata=calc.metadata, timeout=GRPC_DEADLINE_S
    )
    assert response.value == 42
    return time.monotonic() - started


def open_flood(host: str, port: int) -> tuple[list[socket.socket], OSError | None]:
    """Connections that send nothing (even ones) or half a request line and headers (odd ones).

    Returns them, and the error that stopped the flood early if a connection could not be made.
    """
    sockets: list[socket.socket] = []
    refused: OSError | None = None
    deadline = time.monotonic() + FLOOD_BOUND_S
    try:
        for index in range(FLOOD_SOCKETS):
            if time.monotonic() > deadline:
                break
            try:
                flood = socket.create_connection((host, port), timeout=2.0)
            except OSError as exc:  # the server no longer accepts (out of descriptors, backlog full)
                refused = exc
                break
            sockets.append(flood)
            if index % 2:
                with contextlib.suppress(OSError):  # already closed by the server: that is its right
                    flood.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    except BaseException:
        close_all(sockets)
        raise
    return sockets, refused


def close_all(sockets: list[socket.socket]) -> None:
    for flood in sockets:
        flood.close()


def test_a_half_open_flood_on_the_metrics_port_never_reaches_grpc(calc: RunningService) -> None:
    url = calc.metrics_url
    scrape(url)
    evaluate(calc, calc.channel)
    time.sleep(0.3)
    baseline_threads, baseline_fds = threads(calc.pid), descriptors(calc.pid)
    resource.prlimit(calc.pid, resource.RLIMIT_NOFILE, (DESCRIPTOR_LIMIT, DESCRIPTOR_LIMIT))
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    sockets, refused = open_flood(parts.hostname, parts.port)
    try:
        time.sleep(0.5)  # the server has seen every connection
        flood_threads, flood_fds = threads(calc.pid), descriptors(calc.pid)
        grpc_s = [evaluate(calc, calc.channel) for _ in range(5)]
        # a new gRPC connection, during the flood
        with channel(calc.settings, "calculator", calc.process.address) as fresh:
            grpc_s += [evaluate(calc, fresh) for _ in range(5)]
        during = scrape_within(url, 5.0)
    finally:
        close_all(sockets)
    after = scrape_within(url, 10.0)
    print(f"\n{len(sockets)} half-open connections on the metrics port: threads {baseline_threads} -> "
          f"{flood_threads}, descriptors {baseline_fds} -> {flood_fds} (limit {DESCRIPTOR_LIMIT}); gRPC calls "
          f"max {max(grpc_s) * 1000:.1f} ms; /metrics answered during and after the flood")
    assert flood_threads <= baseline_threads + EXTRA_THREADS
    assert flood_fds < DESCRIPTOR_LIMIT // 2
    assert "grpc_server_handled_total" in during and "grpc_server_handled_total" in after
    # Every connection was accepted (and closed or held) promptly; on a loaded machine the time bound may end the
    # flood before FLOOD_SOCKETS, which is still a flood several times the descriptor limit.
    assert refused is None, f"connection {len(sockets) + 1} to the metrics port failed: {refused}"
    assert len(sockets) >= FLOOD_SOCKETS // 2


def grpc_series(found: dict[Series, float]) -> set[Series]:
    return {key for key in found if key[0].startswith("grpc_server_")}


def unknown(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    everything = {"grpc_type": "unknown", "grpc_service": "unknown", "grpc_method": "unknown", **labels}
    return tuple(sorted(everything.items()))


def test_unknown_methods_are_counted_under_one_label_and_logged(calc: RunningService) -> None:
    before = samples(calc.metrics_url)
    names = [f"{CALCULATOR}/Nothing{index}" for index in range(50)]
    names += ["/no.such.Service/" + "x" * 1000, "/no-slash-at-all", f"{CALCULATOR}/Evaluate\" \"forged"]
    for name in names:
        method = calc.channel.unary_unary(name, request_serializer=bytes, response_deserializer=bytes)
        with pytest.raises(grpc.RpcError) as caught:
            method(b"\x0a\x03abc", metadata=calc.metadata, timeout=5.0)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED, (name[:60], caught.value.details())
        assert len(caught.value.details() or "") < 200
    streaming = calc.channel.unary_stream(f"{CALCULATOR}/Stream", request_serializer=bytes, response_deserializer=bytes)
    with pytest.raises(grpc.RpcError) as caught:
        list(streaming(b"", timeout=5.0))  # no token either: still UNIMPLEMENTED, nothing else said
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    calls = len(names) + 1
    after = samples(calc.metrics_url)
    print(f"\n{calls} calls to unknown methods: grpc series {len(grpc_series(before))} -> {len(grpc_series(after))}")
    assert grpc_series(after) == grpc_series(before), "no label set was added by a caller's method name"
    started = ("grpc_server_started_total", unknown({}))
    handled = ("grpc_server_handled_total", unknown({"grpc_code": "Unimplemented"}))
    assert after[started] - before.get(started, 0) == calls
    assert after[handled] - before.get(handled, 0) == calls
    values = {value for _, labels in after for _, value in labels}
    assert not any("Nothing" in value or "xxxx" in value for value in values)

    deadline = time.monotonic() + 5.0
    logged: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        logged = [entry for entry in access_entries(calc.process.log()) if entry["code"] == "UNIMPLEMENTED"]
        if len(logged) >= calls:
            break
        time.sleep(0.2)
    assert len(logged) == calls
    methods = [str(entry["method"]) for entry in logged]
    assert methods[:50] == names[:50]
    assert all(len(method) <= 131 for method in methods)
    assert methods[50].startswith("/no.such.Service/xxx") and methods[50].endswith("...")
    assert names[-1] in methods  # the quote stays inside its JSON string
