"""OpenTelemetry tracing for both halves of the mesh: OTLP/HTTP export when the environment asks, nothing otherwise.

The switch is the standard one: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) set means "export spans there";
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turn it off again.
The exporter reads the rest of the standard variables itself (headers,
timeout, compression, certificates). Without them there is no tracer provider,
no exporter and no thread, and callers skip span creation altogether, so
tracing that is off costs an ``is None`` test per call.

Why no global tracer provider: tests and benchmarks run several servers and
an orchestrator in one process, each with its own ``service.name``; each gets
its own provider, and nothing depends on import order.

The propagator is OpenTelemetry's own W3C one (``traceparent``, plus
``baggage`` for the agent's name when tracing is on).

Metrics over OTLP (the orchestrator's ``gen_ai.client.token.usage``) follow
the same switch with the metrics variables: ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` set, ``OTEL_METRICS_EXPORTER=none`` or
``OTEL_SDK_DISABLED=true`` not (``setup_metrics``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace import Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

__all__ = [
    "AGENT_BAGGAGE_KEY",
    "ENDPOINT_VARIABLES",
    "OFF",
    "PROPAGATOR",
    "TRACECONTEXT",
    "Telemetry",
    "export_requested",
    "metrics_requested",
    "setup_metrics",
    "setup_tracing",
]

log = logging.getLogger("heist.telemetry")

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
"""Either one set (non-empty) turns span export on."""
METRICS_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
"""Either one set (non-empty) turns metric export on."""
SERVICE_NAMESPACE = "heist-mesh"
AGENT_BAGGAGE_KEY = "heist.agent"
"""W3C baggage entry with the calling agent's name (servers put it on their spans)."""

TRACECONTEXT = TraceContextTextMapPropagator()
"""``traceparent`` only: what every call carries, also with tracing off (servers log its trace ID)."""
PROPAGATOR = CompositePropagator([TRACECONTEXT, W3CBaggagePropagator()])
"""``traceparent`` plus ``baggage``: what a traced call carries."""


def export_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the standard OpenTelemetry variables ask for spans to be exported over OTLP."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() in ("none", ""):
        return False
    return any(env.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def metrics_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the standard OpenTelemetry variables ask for metrics to be exported over OTLP."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_METRICS_EXPORTER", "otlp").strip().lower() in ("none", ""):
        return False
    return any(env.get(name, "").strip() for name in METRICS_ENDPOINT_VARIABLES)


def setup_metrics(service_name: str, environ: Mapping[str, str] | None = None) -> MeterProvider | None:
    """Return a meter provider for ``service_name`` exporting over OTLP/HTTP when ``metrics_requested``; else None.

    Not the global provider, for the reason tracers are not (module docstring);
    its owner shuts it down, which exports what is still unsent.
    """
    env = os.environ if environ is None else environ
    if not metrics_requested(env):
        return None
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"service.name": service_name, "service.namespace": SERVICE_NAMESPACE})
    return MeterProvider(metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())], resource=resource)


@dataclass(frozen=True)
class Telemetry:
    """One process part's tracer (None: tracing is off) and the provider to flush at the end."""

    tracer: Tracer | None = None
    provider: TracerProvider | None = None

    @property
    def enabled(self) -> bool:
        """Whether spans are created and exported."""
        return self.tracer is not None

    def shutdown(self) -> None:
        """Export what is still queued and stop the exporter thread (idempotent; a no-op when off)."""
        if self.provider is not None:
            self.provider.shutdown()


OFF = Telemetry()


def setup_tracing(service_name: str, environ: Mapping[str, str] | None = None) -> Telemetry:
    """Return a tracer for ``service_name`` exporting over OTLP/HTTP when ``export_requested``; ``OFF`` otherwise.

    ``service.name`` is ours (``heist-<service>``), not ``OTEL_SERVICE_NAME``:
    ``make serve`` hands one environment to every server, and each must still
    be told apart. Other resource attributes come from ``OTEL_RESOURCE_ATTRIBUTES``.
    """
    env = os.environ if environ is None else environ
    if not export_requested(env):
        return OFF
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    if protocol and protocol != "http/protobuf":
        log.warning("OTLP protocol %r is not supported here; exporting with http/protobuf instead", protocol)
    # The SDK and exporter only when asked for: they start a thread and cost import time.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": service_name, "service.namespace": SERVICE_NAMESPACE})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return Telemetry(provider.get_tracer("heist-mesh"), provider)
