"""Prometheus metrics of one server: the gRPC series Grafana's dashboards expect, plus each service's own.

Names and labels are those of go-grpc-prometheus (``grpc_server_started_total``,
``grpc_server_handled_total``, ``grpc_server_handling_seconds``, the message
counters), with ``grpc_code`` spelled as Go spells status codes (``OK``,
``InvalidArgument``, ``Unauthenticated``...), so the usual gRPC dashboards and
alerts work unchanged. Labels never carry a session ID, a client-chosen value or
anything else unbounded: one time series per method and code, known at start.

Why a registry per server, not the process-wide default: tests and benchmarks
run several servers in one process, and each must expose only its own series.
Why children are created when a method is registered: a labelled child costs a
dictionary lookup and a lock to find on every call; bound once, a call pays only
for the increments (see ``MethodMetrics``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.registry import Collector

from heist_common.config import split_address

__all__ = [
    "GO_CODE_NAMES",
    "LATENCY_BUCKETS",
    "AuthMetrics",
    "MethodMetrics",
    "MetricsEndpoint",
    "ServerMetrics",
    "go_code",
]

log = logging.getLogger("heist.server")

GO_CODE_NAMES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}
"""``grpc_code`` label values: Go's ``codes.Code.String()``, which go-grpc-prometheus uses."""

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds. Prometheus' default buckets start at 5 ms, above most calls here (a memory call takes ~0.1 ms)."""

AUTH_REASONS = (
    "missing", "malformed", "expired", "unknown_key", "bad_signature", "wrong_issuer", "wrong_audience",
    "missing_scope", "no_session", "other_session", "no_verifier",
)  # fmt: skip
"""Why a token check can fail (``servers.middleware`` and ``servers.tokens``); a fixed set, so a fixed cardinality."""


def go_code(code: grpc.StatusCode) -> str:
    """Return the ``grpc_code`` label of a status code."""
    return GO_CODE_NAMES.get(code, "Unknown")


def rpc_type(request_streaming: bool, response_streaming: bool) -> str:
    """Return the ``grpc_type`` label: unary, client_stream, server_stream or bidi_stream."""
    if request_streaming:
        return "bidi_stream" if response_streaming else "client_stream"
    return "server_stream" if response_streaming else "unary"


@dataclass(frozen=True, slots=True)
class MethodMetrics:
    """The series of one method, bound once: a call costs a few increments and one observation."""

    started: Any
    received: Any
    sent: Any
    seconds: Any
    handled: dict[grpc.StatusCode, Any]

    def begin(self) -> None:
        """Count a call that has arrived (its request message received, for unary requests)."""
        self.started.inc()
        self.received.inc()

    def end(self, code: grpc.StatusCode, seconds: float) -> None:
        """Count a finished call with its status code and handling time."""
        self.handled[code].inc()
        self.seconds.observe(seconds)
        if code is grpc.StatusCode.OK:
            self.sent.inc()


class AuthMetrics:
    """``heist_auth_verdicts_total``: every token check's outcome, by reason (bound children, a fixed set)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        verdicts = Counter(
            "heist_auth_verdicts",
            "Token checks on methods that need a scope, by verdict (ok or denied) and reason.",
            ("verdict", "reason"),
            registry=registry,
        )
        self.ok = verdicts.labels("ok", "")
        self.denied = {reason: verdicts.labels("denied", reason) for reason in AUTH_REASONS}
        self._family = verdicts

    def deny(self, reason: str) -> None:
        """Count a refused token (an unforeseen reason is counted as ``other``)."""
        child = self.denied.get(reason)
        if child is None:
            child = self._family.labels("denied", "other")
        child.inc()


class ServerMetrics:
    """Every series one server exposes, in its own registry."""

    def __init__(self, service: str, collectors: Iterable[Collector] = ()) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        labels = ("grpc_type", "grpc_service", "grpc_method")
        self._started = Counter(
            "grpc_server_started", "Total number of RPCs started on the server.", labels, registry=self.registry
        )
        self._handled = Counter(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            (*labels, "grpc_code"),
            registry=self.registry,
        )
        self._received = Counter(
            "grpc_server_msg_received", "Total number of RPC stream messages received on the server.", labels,
            registry=self.registry,
        )  # fmt: skip
        self._sent = Counter(
            "grpc_server_msg_sent", "Total number of gRPC stream messages sent by the server.", labels,
            registry=self.registry,
        )  # fmt: skip
        self._seconds = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.auth = AuthMetrics(self.registry)
        for collector in collectors:
            self.registry.register(collector)

    def method(self, path: str, request_streaming: bool, response_streaming: bool) -> MethodMetrics:
        """Bind the series of one ``/package.Service/Method`` (every status code pre-created, as go-grpc-prometheus)."""
        service, _, method = path.lstrip("/").rpartition("/")
        labels = (rpc_type(request_streaming, response_streaming), service, method)
        return MethodMetrics(
            started=self._started.labels(*labels),
            received=self._received.labels(*labels),
            sent=self._sent.labels(*labels),
            seconds=self._seconds.labels(*labels),
            handled={code: self._handled.labels(*labels, name) for code, name in GO_CODE_NAMES.items()},
        )


class MetricsEndpoint:
    """``GET /metrics`` of one server on its own HTTP address, served by prometheus_client on a daemon thread.

    A thread, not the server's event loop: a scrape then never delays a call's
    coroutine, and encoding the text takes the GIL only for a moment.
    """

    def __init__(self, registry: CollectorRegistry, address: str) -> None:
        host, port = split_address(address)
        try:
            self._httpd: WSGIServer
            self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
        self.port = int(self._httpd.server_address[1])
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def thread(self) -> threading.Thread:
        """The serving thread (tests check it ends)."""
        return self._thread
