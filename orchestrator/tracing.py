"""W3C Trace Context on every RPC: one trace per agent turn, one span per call.

Why: the session ID ties rows and log lines to a heist; a trace ID ties every
call of one *turn* together across services (OAuth, memory, tools), so a slow or
failed turn can be followed from its ``messages`` row into each server's log.
The header is the standard ``traceparent``, so servers instrumented with
OpenTelemetry join the same trace; no collector is needed to use it here.
"""

from __future__ import annotations

import os
from contextvars import ContextVar

TRACEPARENT_VERSION = "00"
SAMPLED = "01"

_current_trace_id: ContextVar[str | None] = ContextVar("heist_trace_id", default=None)


def start_trace() -> str:
    """Begin a new trace in the current task's context and return its 32-hex-digit ID."""
    trace_id = os.urandom(16).hex()
    _current_trace_id.set(trace_id)
    return trace_id


def current_trace_id() -> str | None:
    """Return the trace the current task is in, if any."""
    return _current_trace_id.get()


def traceparent() -> str | None:
    """Build a ``traceparent`` value for one outgoing call: the current trace, a fresh span ID."""
    trace_id = _current_trace_id.get()
    if trace_id is None:
        return None
    return f"{TRACEPARENT_VERSION}-{trace_id}-{os.urandom(8).hex()}-{SAMPLED}"
