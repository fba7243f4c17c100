"""A real OTLP/HTTP receiver for tests: what a collector (Jaeger, Tempo, Alloy) would be sent.

It accepts ``POST /v1/traces`` with a protobuf ``ExportTraceServiceRequest``
and ``POST /v1/metrics`` with an ``ExportMetricsServiceRequest`` (gzip or not),
decodes them with ``opentelemetry-proto`` and keeps every span and histogram
point with its ``service.name``; anything else is refused, so a malformed
export fails the test instead of passing silently.
"""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@dataclass(frozen=True)
class ReceivedSpan:
    """One decoded span."""

    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any] = field(hash=False)
    status_code: int = 0

    @property
    def is_root(self) -> bool:
        return not self.parent_span_id


@dataclass(frozen=True)
class ReceivedPoint:
    """One decoded histogram data point (cumulative: the latest export of a series holds its whole count)."""

    service: str
    metric: str
    unit: str
    attributes: dict[str, Any] = field(hash=False)
    count: int = 0
    sum: float = 0.0


class OTLPReceiver:
    """``start()``/``stop()`` or a context manager; ``endpoint`` is what OTEL_EXPORTER_OTLP_ENDPOINT takes."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.points: list[ReceivedPoint] = []
        self.requests = 0
        self.rejected: list[str] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> OTLPReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                paths = ("/v1/traces", "/v1/metrics")
                if self.path not in paths or self.headers.get("Content-Type") != "application/x-protobuf":
                    receiver._reject(f"{self.path} {self.headers.get('Content-Type')}")
                    self._answer(404, b"")
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    raw = gzip.decompress(raw)
                if self.path == "/v1/metrics":
                    metrics = ExportMetricsServiceRequest()
                    metrics.ParseFromString(raw)
                    receiver._add_metrics(metrics)
                    self._answer(200, ExportMetricsServiceResponse().SerializeToString())
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(raw)
                receiver._add(request)
                self._answer(200, ExportTraceServiceResponse().SerializeToString())

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> OTLPReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _reject(self, what: str) -> None:
        with self._lock:
            self.rejected.append(what)

    def _add(self, request: ExportTraceServiceRequest) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            resource = {item.key: _value(item.value) for item in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        ReceivedSpan(
                            service=str(resource.get("service.name", "")),
                            name=span.name,
                            kind=span.kind,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={item.key: _value(item.value) for item in span.attributes},
                            status_code=span.status.code,
                        )
                    )
        with self._lock:
            self.requests += 1
            self.spans.extend(spans)

    def _add_metrics(self, request: ExportMetricsServiceRequest) -> None:
        points = []
        for resource_metrics in request.resource_metrics:
            resource = {item.key: _value(item.value) for item in resource_metrics.resource.attributes}
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    for point in metric.histogram.data_points:
                        points.append(
                            ReceivedPoint(
                                service=str(resource.get("service.name", "")),
                                metric=metric.name,
                                unit=metric.unit,
                                attributes={item.key: _value(item.value) for item in point.attributes},
                                count=point.count,
                                sum=point.sum,
                            )
                        )
        with self._lock:
            self.requests += 1
            self.points.extend(points)

    def traces(self) -> dict[str, list[ReceivedSpan]]:
        """Spans grouped by trace ID."""
        with self._lock:
            grouped: dict[str, list[ReceivedSpan]] = {}
            for span in self.spans:
                grouped.setdefault(span.trace_id, []).append(span)
            return grouped
