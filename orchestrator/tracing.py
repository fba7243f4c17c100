"""One trace per agent turn, and the turn's timeline: what every RPC and LLM request of a turn reports to.

Why a turn scope: the session ID ties rows and log lines to a heist; a trace ID
ties every call of one *turn* together across services (OAuth, memory, tools,
the LLM), so a slow or failed turn can be followed from its ``messages`` row
into each server's log and, with a collector, into one trace. The same scope
keeps the turn's timeline (``Step``: what ran when, for how long), which the
audit stores and ``orchestrator report`` draws as a waterfall.

Tracing on (``OTEL_EXPORTER_OTLP_*`` set, ``heist_common.telemetry``): the turn
is an OpenTelemetry span; each RPC and LLM request is a CLIENT span under it,
and OpenTelemetry's W3C propagator puts its ``traceparent`` (and the agent in
``baggage``) on the call, so the servers' spans are its children.

Tracing off: no span is created. The turn still gets a random trace ID and one
``traceparent`` (formatted once per turn by the same propagator, flags "not
sampled"), which every call of the turn carries, so the servers' access logs
and ``messages.trace_id`` work as before at the cost of a tuple append per call.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from opentelemetry import baggage, context
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    Tracer,
    format_trace_id,
    set_span_in_context,
)

from heist_common.contract import TRACEPARENT_METADATA_KEY
from heist_common.telemetry import AGENT_BAGGAGE_KEY, PROPAGATOR, TRACECONTEXT

__all__ = [
    "STEP_FIELDS",
    "Step",
    "TurnScope",
    "current_trace_id",
    "current_turn",
    "elapsed_ms",
    "read_timings",
    "rpc_service",
    "step_kind",
    "timings_json",
    "turn_scope",
]

TIMINGS_VERSION = 1
STEP_FIELDS = ("kind", "name", "start_ms", "ms", "code")
"""What each step of ``messages.timings`` holds, in order (the JSON keeps them as arrays: compact, cheap to encode)."""


def elapsed_ms(started: float) -> float:
    """Milliseconds since ``started`` (a ``time.perf_counter()`` reading)."""
    return (time.perf_counter() - started) * 1000.0


def step_kind(service: str) -> str:
    """Return the timeline's kind of an RPC to ``service``: ``token`` (OAuth), ``memory`` or ``tool``."""
    if service == "oauth":
        return "token"
    if service == "memory":
        return "memory"
    return "tool"


class Step(NamedTuple):
    """One thing a turn waited for: an RPC, an LLM request, the audit write (a tuple: made on every call)."""

    kind: str
    """``llm``, ``token``, ``memory``, ``tool`` or ``audit``."""
    name: str
    """``calculator.Evaluate``, ``completions``, ``write_turn``..."""
    start_ms: float
    """From the start of the turn."""
    ms: float
    code: str = "OK"
    """gRPC status name, ``CIRCUIT_OPEN``, ``HTTP 500``, ``TIMEOUT``... (``OK`` when it worked)."""


RPC_KINDS = frozenset({"token", "memory", "tool"})
"""Step kinds that are calls to a mesh service (``step_kind``)."""


def rpc_service(step: Step) -> str | None:
    """Return the service an RPC step called (RPC steps are named ``service.Method``); None for any other step."""
    if step.kind not in RPC_KINDS:
        return None
    service, dot, _ = step.name.partition(".")
    return service if dot else None  # "token (cached)": no call was made


@dataclass(slots=True)
class TurnScope:
    """Everything a turn's calls report to: its trace and its timeline."""

    session_id: str
    agent: str
    turn_id: int
    trace_id: str
    tracer: Tracer | None
    span: Span
    started: float = field(default_factory=time.perf_counter)
    steps: list[Step] = field(default_factory=list)
    parent: context.Context | None = None
    """The turn span as an OpenTelemetry context, with the agent in baggage (tracing on)."""
    metadata: tuple[tuple[str, str], ...] = ()
    """The one ``traceparent`` every call of the turn carries (tracing off)."""

    def record(self, kind: str, name: str, started: float, code: str = "OK") -> None:
        """Add a step that began at ``started`` (``time.perf_counter()``) and ends now."""
        now = time.perf_counter()
        self.steps.append(
            Step(kind, name, round((started - self.started) * 1000.0, 3), round((now - started) * 1000.0, 3), code)
        )

    def client_span(self, name: str, attributes: dict[str, Any]) -> Span | None:
        """Start a CLIENT span under the turn (None with tracing off)."""
        if self.tracer is None:
            return None
        attributes["heist.session_id"] = self.session_id
        attributes["heist.agent"] = self.agent
        attributes["heist.turn_id"] = self.turn_id
        return self.tracer.start_span(name, context=self.parent, kind=SpanKind.CLIENT, attributes=attributes)

    def outgoing(self, span: Span | None) -> tuple[tuple[str, str], ...]:
        """Return the W3C headers of one call: of its own span (tracing on) or the turn's (off)."""
        if span is None:
            return self.metadata
        carrier: dict[str, str] = {}
        PROPAGATOR.inject(carrier, context=set_span_in_context(span, self.parent))
        return tuple(carrier.items())


def end_span(span: Span | None, code: str, detail: str = "") -> None:
    """Close a CLIENT span: any code but OK is an error on the calling side."""
    if span is None:
        return
    if code != "OK":
        span.set_status(Status(StatusCode.ERROR, f"{code}: {detail}"[:200]))
    span.end()


_turn: ContextVar[TurnScope | None] = ContextVar("heist_turn", default=None)


def current_turn() -> TurnScope | None:
    """Return the turn the current task works for, if any."""
    return _turn.get()


def current_trace_id() -> str | None:
    """Return the trace ID of the current turn, if any."""
    scope = _turn.get()
    return scope.trace_id if scope is not None else None


@contextmanager
def turn_scope(tracer: Tracer | None, session_id: str, agent: str, turn_id: int) -> Iterator[TurnScope]:
    """Open a turn: a new trace (a root span when tracing is on) that every call made inside reports to.

    Re-entering for the turn that is already open reuses it, so the runner can
    open the turn before it starts prefetching (the prefetch belongs to it) and
    ``CrewAgent.take_turn`` still opens one when called on its own.
    """
    open_scope = _turn.get()
    if open_scope is not None and (open_scope.session_id, open_scope.agent, open_scope.turn_id) == (
        session_id, agent, turn_id,
    ):  # fmt: skip
        yield open_scope
        return
    if tracer is None:
        span_context = SpanContext(
            int.from_bytes(os.urandom(16), "big") or 1,
            int.from_bytes(os.urandom(8), "big") or 1,
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.DEFAULT),
        )
        span: Span = NonRecordingSpan(span_context)
        carrier: dict[str, str] = {}
        TRACECONTEXT.inject(carrier, context=set_span_in_context(span, context.Context()))
        scope = TurnScope(
            session_id, agent, turn_id, format_trace_id(span_context.trace_id), None, span,
            metadata=((TRACEPARENT_METADATA_KEY, carrier[TRACEPARENT_METADATA_KEY]),),
        )  # fmt: skip
    else:
        span = tracer.start_span(
            f"turn {turn_id} {agent}",
            context=context.Context(),  # a new trace, whatever the caller's context holds
            kind=SpanKind.INTERNAL,
            attributes={"heist.session_id": session_id, "heist.agent": agent, "heist.turn_id": turn_id},
        )
        parent = baggage.set_baggage(AGENT_BAGGAGE_KEY, agent, set_span_in_context(span, context.Context()))
        trace_id = format_trace_id(span.get_span_context().trace_id)
        scope = TurnScope(session_id, agent, turn_id, trace_id, tracer, span, parent=parent)
    token = _turn.set(scope)
    try:
        yield scope
    except BaseException as exc:
        if tracer is not None:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        _turn.reset(token)
        if tracer is not None:
            span.end()


def timings_json(steps: list[Step], total_ms: float) -> str:
    """Return the turn's timeline as stored in ``messages.timings``: compact JSON, steps in start order.

    ``{"v": 1, "total_ms": 61.4, "fields": ["kind", "name", "start_ms", "ms", "code"],
    "steps": [["memory", "memory.GetCompressedMemory", 0.0, 1.2, "OK"], ...]}``
    """
    ordered = sorted(steps, key=_start)
    return json.dumps(
        {"v": TIMINGS_VERSION, "total_ms": round(total_ms, 3), "fields": STEP_FIELDS, "steps": ordered},
        separators=(",", ":"),
    )


def _start(step: Step) -> float:
    return step.start_ms


def read_timings(raw: object) -> tuple[list[Step], float] | None:
    """Parse a ``messages.timings`` value back into steps and the turn's total; None if it is not one of ours."""
    if not isinstance(raw, str) or not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
        return None
    steps = []
    for item in data["steps"]:
        if not (isinstance(item, list) and len(item) == len(STEP_FIELDS)):
            continue
        kind, name, start_ms, ms, code = item
        if isinstance(kind, str) and isinstance(start_ms, int | float) and isinstance(ms, int | float):
            steps.append(Step(kind, str(name), float(start_ms), float(ms), str(code)))
    total = data.get("total_ms")
    if not isinstance(total, int | float) or not math.isfinite(total) or total <= 0:
        total = max((step.start_ms + step.ms for step in steps), default=0.0)
    return steps, float(total)
