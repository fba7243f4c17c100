"""Prometheus metrics of one server: the gRPC series Grafana's dashboards expect, plus each service's own.

Names and labels are those of go-grpc-prometheus (``grpc_server_started_total``,
``grpc_server_handled_total``, ``grpc_server_handling_seconds``, the message
counters), with ``grpc_code`` spelled as Go spells status codes (``OK``,
``InvalidArgument``, ``Unauthenticated``...), so the usual gRPC dashboards and
alerts work unchanged. Labels never carry a session ID, a client-chosen value or
anything else unbounded: one time series per method and code, known at start;
calls to methods the server does not have share one ``unknown`` method.

Why a registry per server, not the process-wide default: tests and benchmarks
run several servers in one process, and each must expose only its own series.
Why each method's counts are created when it is registered and kept as plain
numbers: a call then pays for a few additions and no lookup or lock (see
``MethodMetrics``); the numbers become Prometheus families only when scraped.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import accumulate

import grpc
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from heist_common.config import split_address

__all__ = [
    "GO_CODE_NAMES",
    "LATENCY_BUCKETS",
    "UNKNOWN",
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
"""Seconds. Prometheus' default buckets start at 5 ms, above most calls here (memory calls are sub-millisecond)."""

AUTH_REASONS = (
    "missing", "malformed", "expired", "unknown_key", "bad_signature", "wrong_issuer", "wrong_audience",
    "missing_scope", "no_session", "other_session", "no_verifier",
)  # fmt: skip
"""Why a token check can fail (``runtime.middleware``, ``auth.tokens``); a fixed set, so a fixed cardinality."""


UNKNOWN = "unknown"
"""``grpc_type``, ``grpc_service`` and ``grpc_method`` of calls to methods the server does not have."""


def go_code(code: grpc.StatusCode) -> str:
    """Return the ``grpc_code`` label of a status code."""
    return GO_CODE_NAMES.get(code, "Unknown")


def rpc_type(request_streaming: bool, response_streaming: bool) -> str:
    """Return the ``grpc_type`` label: unary, client_stream, server_stream or bidi_stream."""
    if request_streaming:
        return "bidi_stream" if response_streaming else "client_stream"
    return "server_stream" if response_streaming else "unary"


class MethodMetrics:
    """The counts of one method: plain numbers, bumped by the event loop's thread, read by the scrape's.

    Why not prometheus_client's Counter and Histogram: each of their increments
    takes a lock (several per call), while every
    call of a grpc.aio server runs on one thread; a single writer needs no lock,
    and a reader on another thread sees each number whole (the GIL), at worst
    one call behind. ``ServerMetrics.collect`` exposes them in the usual types.
    For unary methods one message each way is implied, so the message counters
    are derived at scrape time instead of counted.
    """

    __slots__ = ("bucket_counts", "handled", "labels", "received", "sent", "started", "streaming", "sum")

    def __init__(self, labels: tuple[str, str, str], streaming: bool) -> None:
        self.labels = labels
        self.streaming = streaming
        self.started = 0
        self.received = 0
        self.sent = 0
        self.handled = dict.fromkeys(GO_CODE_NAMES, 0)
        self.bucket_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def begin(self) -> None:
        """Count a call that has arrived."""
        self.started += 1

    def end(self, code: grpc.StatusCode, seconds: float) -> None:
        """Count a finished call with its status code and handling time."""
        self.handled[code] = self.handled.get(code, 0) + 1
        self.bucket_counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds

    def message_sent(self) -> None:
        """Count one response message of a streaming method (unary ones are derived from OK calls)."""
        self.sent += 1


class AuthMetrics:
    """``heist_auth_verdicts_total``: every token check's outcome, by reason (a fixed set, plain numbers)."""

    def __init__(self) -> None:
        self.ok = 0
        self.denied = dict.fromkeys(AUTH_REASONS, 0)

    def allow(self) -> None:
        """Count an accepted token."""
        self.ok += 1

    def deny(self, reason: str) -> None:
        """Count a refused token (an unforeseen reason is counted as ``other``)."""
        key = reason if reason in self.denied else "other"
        self.denied[key] = self.denied.get(key, 0) + 1


class ServerMetrics(Collector):
    """Every series one server exposes, in its own registry (this collector, process metrics, the service's)."""

    def __init__(self, service: str, collectors: Iterable[Collector] = ()) -> None:
        self.service = service
        self.methods: list[MethodMetrics] = []
        self.auth = AuthMetrics()
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(self)
        for collector in collectors:
            self.registry.register(collector)

    def method(self, path: str, request_streaming: bool, response_streaming: bool) -> MethodMetrics:
        """Create the counts of one ``/package.Service/Method`` (every status code present from the start)."""
        service, _, method = path.lstrip("/").rpartition("/")
        counted = MethodMetrics(
            (rpc_type(request_streaming, response_streaming), service, method), request_streaming or response_streaming
        )
        self.methods.append(counted)
        return counted

    def unknown_methods(self) -> MethodMetrics:
        """Create the one set of counts every call to a method this server does not have is counted in.

        Labelled ``unknown`` (type, service and method) whatever the caller asked for, so a caller cannot add series.
        """
        counted = MethodMetrics((UNKNOWN, UNKNOWN, UNKNOWN), streaming=True)
        self.methods.append(counted)
        return counted

    def describe(self) -> Iterator[Metric]:
        """Nothing up front (the registry then collects to check names, which is cheap here)."""
        return iter(())

    def collect(self) -> Iterator[Metric]:
        """Yield the go-grpc-prometheus families and the auth verdicts from the current counts."""
        names = ("grpc_type", "grpc_service", "grpc_method")
        started = CounterMetricFamily("grpc_server_started", "Total number of RPCs started on the server.",
                                      labels=names)  # fmt: skip
        handled = CounterMetricFamily(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            labels=(*names, "grpc_code"),
        )
        received = CounterMetricFamily(
            "grpc_server_msg_received", "Total number of RPC stream messages received on the server.", labels=names
        )
        sent = CounterMetricFamily(
            "grpc_server_msg_sent", "Total number of gRPC stream messages sent by the server.", labels=names
        )
        seconds = HistogramMetricFamily(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            labels=names,
        )
        bounds = [*(str(bound) for bound in LATENCY_BUCKETS), "+Inf"]
        for counted in list(self.methods):
            labels = list(counted.labels)
            calls = counted.started
            started.add_metric(labels, calls)
            for code, count in list(counted.handled.items()):
                handled.add_metric([*labels, GO_CODE_NAMES.get(code, "Unknown")], count)
            ok = counted.handled.get(grpc.StatusCode.OK, 0)
            received.add_metric(labels, counted.received if counted.streaming else calls)
            sent.add_metric(labels, counted.sent if counted.streaming else ok)
            cumulative = list(accumulate(counted.bucket_counts))
            seconds.add_metric(labels, list(zip(bounds, cumulative, strict=True)), counted.sum)
        yield from (started, handled, received, sent, seconds)
        verdicts = CounterMetricFamily(
            "heist_auth_verdicts", "Token checks on methods that need a scope, by verdict (ok or denied) and reason.",
            labels=("verdict", "reason"),
        )  # fmt: skip
        verdicts.add_metric(["ok", ""], self.auth.ok)
        for reason, count in list(self.auth.denied.items()):
            verdicts.add_metric(["denied", reason], count)
        yield verdicts


MAX_REQUEST_HEAD_BYTES = 8192
"""Longest request line and headers the metrics endpoint reads; a longer head closes the connection."""


class MetricsEndpoint:
    """``GET /metrics`` of one server on its own HTTP address, served from the server's event loop.

    Why not prometheus_client's ``start_http_server``: it spends a thread and a
    descriptor on every connection for as long as the client likes, so a flood
    of half-open connections took the process's threads and descriptors and,
    with them, its gRPC port. Here a connection is a coroutine; at most
    ``max_connections`` are open (a newcomer takes the place of the oldest one
    that has not sent its request yet, else it is closed at once), and each is
    closed after ``timeout_s`` whatever it did. The text is encoded on one
    thread of its own, so a scrape never holds up a call's coroutine for long.
    One request per connection (``Connection: close``).
    """

    def __init__(
        self, registry: CollectorRegistry, host: str, max_connections: int, timeout_s: float
    ) -> None:
        self.registry = registry
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self.port = 0
        self.url = ""
        self._host = host
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._reading: dict[asyncio.StreamWriter, None] = {}
        """Open connections that have not sent their request head yet, oldest first."""
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heist-metrics")

    @classmethod
    async def start(
        cls, registry: CollectorRegistry, address: str, *, max_connections: int = 16, timeout_s: float = 5.0
    ) -> MetricsEndpoint:
        """Listen on ``address`` (port 0: any free port) in the running event loop; OSError naming it if it cannot."""
        host, port = split_address(address)
        endpoint = cls(registry, host, max_connections, timeout_s)
        try:
            endpoint._server = await asyncio.start_server(
                endpoint._connection, host, port, limit=MAX_REQUEST_HEAD_BYTES
            )
        except OSError as exc:
            endpoint._encoder.shutdown(wait=False)
            raise OSError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
        endpoint.port = int(endpoint._server.sockets[0].getsockname()[1])
        endpoint.url = f"http://{f'[{host}]' if ':' in host else host}:{endpoint.port}/metrics"
        return endpoint

    @property
    def connections(self) -> int:
        """Connections open now (tests check the cap)."""
        return len(self._open)

    async def stop(self) -> None:
        """Stop listening and close every connection (idempotent)."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._open):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None
        self._encoder.shutdown(wait=False, cancel_futures=True)

    def _make_room(self) -> bool:
        """Close the oldest connection still sending its request (a scraper sends at once); False if none is."""
        for writer in self._reading:
            del self._reading[writer]
            self._open.discard(writer)
            writer.transport.abort()
            return True
        return False

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= self.max_connections and not self._make_room():
            writer.transport.abort()
            return
        self._open.add(writer)
        self._reading[writer] = None
        answered = False
        try:
            async with asyncio.timeout(self.timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
                if self._reading.pop(writer, writer) is writer:
                    return  # closed to make room while its last bytes were being read
                writer.write(await self._response(head))
                writer.transport.set_write_buffer_limits(high=0)  # drain() now waits until all is sent
                await writer.drain()
                answered = True
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            self._reading.pop(writer, None)
            self._open.discard(writer)
            if answered:
                writer.close()
            else:
                writer.transport.abort()

    async def _response(self, head: bytes) -> bytes:
        """Build the whole HTTP response to one request head: the metrics, 404 or 405."""
        method, _, rest = head.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        if method not in (b"GET", b"HEAD"):
            return _http(b"405 Method Not Allowed", b"text/plain; charset=utf-8", b"only GET and HEAD\n")
        if path not in (b"/metrics", b"/"):
            return _http(b"404 Not Found", b"text/plain; charset=utf-8", b"metrics are at /metrics\n")
        body = await asyncio.get_running_loop().run_in_executor(self._encoder, generate_latest, self.registry)
        return _http(b"200 OK", CONTENT_TYPE_PLAIN_0_0_4.encode(), body, head_only=method == b"HEAD")


def _http(status: bytes, content_type: bytes, body: bytes, *, head_only: bool = False) -> bytes:
    """Build an HTTP/1.1 response that closes its connection."""
    head = (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: " + content_type
        + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
    )  # fmt: skip
    return head if head_only else head + body
