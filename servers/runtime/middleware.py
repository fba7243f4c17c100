"""Per-call middleware every heist server gets: access log, bearer-token auth, last-resort error mapping.

Kept apart from the server's lifecycle (``servers.runtime.lifecycle``): this is what
happens on each call, that is what happens once per process.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import baggage
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, use_span

from heist_common.contract import (
    AUTHORIZATION_METADATA_KEY,
    CALL_ID_METADATA_KEY,
    ON_BEHALF_OF_METADATA_KEY,
    SESSION_METADATA_KEY,
    TRACEPARENT_METADATA_KEY,
)
from heist_common.telemetry import AGENT_BAGGAGE_KEY, PROPAGATOR
from servers.auth.tokens import InvalidTokenError, TokenClaims, TokenVerifier
from servers.runtime.metrics import MethodMetrics, ServerMetrics

log = logging.getLogger("heist.server")

CALLER: contextvars.ContextVar[TokenClaims | None] = contextvars.ContextVar("heist_caller", default=None)
"""The verified token of the call being handled (None for methods that need no token)."""

class AccessLog:
    """Buffers one line per call and writes them in batches.

    Why not a logging call per RPC: formatting and a write syscall per call
    would cost a measurable share of the memory service's throughput; lines
    are flushed a few times a second and at shutdown instead.
    """

    def __init__(self, service: str, stream: Any = None, interval_s: float = 0.2) -> None:
        self._service = service
        self._stream = stream
        self._interval_s = interval_s
        self._lines: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._second = -1
        self._prefix = ""

    def add(self, record: dict[str, object]) -> None:
        """Queue one call as a JSON object on one line (the timestamp is taken now; formatted once per second).

        JSON, not ``key=value`` text: every caller-supplied value is escaped, so a
        session ID with a newline or a space cannot forge a line or a field.
        """
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._prefix = f'{{"time": "{time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))}", ' + (
                f'"service": {json.dumps(self._service)}, '
            )
        self._lines.append(self._prefix + json.dumps(record, ensure_ascii=True)[1:] + "\n")

    def flush(self) -> None:
        """Write every queued line."""
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        stream = self._stream or sys.stderr
        try:
            stream.write("".join(lines))
            stream.flush()
        except (OSError, ValueError):
            pass

    def start(self) -> None:
        """Begin periodic flushing on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop flushing periodically and write what is left."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            self.flush()


ECHO_LIMIT = 64
"""Longest piece of caller input repeated in a status message (a status message is a header: keep it short)."""


def shown(value: object, limit: int = ECHO_LIMIT) -> str:
    """Caller input as it may appear in a status message: quoted, printable, cut to ``limit`` characters."""
    text = str(value)
    cut = text if len(text) <= limit else text[:limit] + "..."
    return repr(cut)


def metadata_value(context: grpc.aio.ServicerContext[Any, Any], key: str) -> str:
    """Return one call metadata value ('' if absent)."""
    return _find(call_metadata(context), key)


def call_metadata(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[Any, ...]:
    """Return the call's metadata; empty (never a traceback) if a value could not be decoded."""
    try:
        return tuple(context.invocation_metadata() or ())
    except (UnicodeDecodeError, ValueError):
        return ()


def _find(metadata: Iterable[Any], key: str) -> str:
    for item in metadata:
        if item[0] == key:
            value = item[1]
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return ""


FIELD_LIMIT = 128
"""Longest caller-supplied value written to the access log."""
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
"""W3C Trace Context, version 00 (lower-case hex only)."""


def _field(value: str) -> str:
    """Return a caller-supplied value as logged: '-' when absent, cut to ``FIELD_LIMIT`` characters."""
    return (value if len(value) <= FIELD_LIMIT else value[:FIELD_LIMIT] + "...") if value else "-"


def trace_id(traceparent: str) -> str:
    """Return the trace ID of a valid ``traceparent`` ('-' when absent or invalid: an invalid one is dropped)."""
    match = TRACEPARENT.match(traceparent)
    if match is None or match.group(1) == "0" * 32 or match.group(2) == "0" * 16:
        return "-"
    return match.group(1)


UNTRACED_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Methods that get no span: health probes (a Kubernetes probe every few seconds would fill a trace store with
root spans) and reflection (grpcurl). They are still counted in the metrics and logged."""
SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
"""Codes that mark a server span as an error (OpenTelemetry's gRPC conventions: the others are the caller's fault)."""


class _MetadataGetter(Getter[tuple[Any, ...]]):
    """Reads W3C headers out of call metadata for the propagator."""

    def get(self, carrier: tuple[Any, ...], key: str) -> list[str] | None:
        """Every value of ``key`` (None if absent)."""
        values = [
            item[1].decode("utf-8", "replace") if isinstance(item[1], bytes) else str(item[1])
            for item in carrier
            if item[0] == key
        ]
        return values or None

    def keys(self, carrier: tuple[Any, ...]) -> list[str]:
        """Every metadata key."""
        return [str(item[0]) for item in carrier]


METADATA_GETTER = _MetadataGetter()


def _denied(reason: str, client: str | None = None) -> dict[str, str]:
    fields = {"auth": "denied", "reason": reason}
    if client is not None:
        fields["client"] = client
    return fields


def session_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """Return the heist session id of the call ('' if the caller sent none)."""
    return metadata_value(context, SESSION_METADATA_KEY)


class CallMiddleware:
    """Access log, auth and last-resort error mapping around every handler.

    Why not a ``grpc.aio.ServerInterceptor``: an interceptor runs as an extra
    coroutine chain on every call, before the handler is even found, which cost
    a measurable share of the memory service's throughput. Instead each method
    handler is wrapped once, when it is registered (``WrappingRegistrar``), and
    everything per call is read from the servicer context.
    """

    def __init__(
        self,
        access_log: AccessLog,
        scopes: dict[str, str | None],
        verifier: TokenVerifier | None,
        metrics: ServerMetrics | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._access_log = access_log
        self._scopes = scopes
        self._verifier = verifier
        self._metrics = metrics
        self._auth_metrics = metrics.auth if metrics is not None else None
        self._tracer = tracer
        self._cache: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        self._unknown = metrics.unknown_methods() if metrics is not None else None

    def wrapped(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        """Return ``handler`` of ``method`` (a ``/package.Service/Method`` path) wrapped; cached per method."""
        cached = self._cache.get(method)
        if cached is None:
            cached = self._wrap(method, handler)
            self._cache[method] = cached
        return cached

    def unknown_methods(self) -> grpc.GenericRpcHandler[Any, Any]:
        """Return a generic handler for every method: registered last, it answers only methods nobody else has."""
        return _UnknownMethods(self)

    def unimplemented(self, method: str) -> grpc.RpcMethodHandler[Any, Any]:
        """Return a handler that answers UNIMPLEMENTED for ``method``, counted as ``unknown``, logged with the name cut.

        Made per call and never cached: the method name is the caller's choice, so keeping one per name would let
        a caller grow the server's memory (and a label per name its metrics).
        """

        async def refuse(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> None:
            started = time.perf_counter()
            counted = self._unknown
            if counted is not None:
                counted.begin()
            metadata = call_metadata(context)
            try:
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"this server has no method {shown(method)}")
            finally:
                self._log(_field(method), context, metadata, started, {}, grpc.StatusCode.UNIMPLEMENTED, counted, None)

        return grpc.stream_stream_rpc_method_handler(refuse)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        scope = self._scopes.get(method)
        deserializer = handler.request_deserializer
        serializer = handler.response_serializer
        counted = (
            self._metrics.method(method, handler.request_streaming, handler.response_streaming)
            if self._metrics is not None
            else None
        )
        tracer = None if method.startswith(UNTRACED_SERVICES) else self._tracer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, scope, handler.unary_unary, counted, tracer), deserializer, serializer
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_streaming(method, scope, handler.unary_stream, counted, tracer), deserializer, serializer
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(method, scope, handler.stream_unary, counted, tracer), deserializer, serializer
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_streaming(method, scope, handler.stream_stream, counted, tracer), deserializer, serializer
            )
        return handler

    def _check(
        self, scope: str, metadata: Iterable[Any]
    ) -> tuple[dict[str, str], grpc.StatusCode | None, str]:
        """Check the call's token (``_verdict``) and count the verdict when metrics are on."""
        verdict = self._verdict(scope, metadata)
        counter = self._auth_metrics
        if counter is not None:
            if verdict[1] is None:
                counter.allow()
            else:
                counter.deny(verdict[0].get("reason", ""))
        return verdict

    def _verdict(
        self, scope: str, metadata: Iterable[Any]
    ) -> tuple[dict[str, str], grpc.StatusCode | None, str]:
        """Check the call's bearer token for ``scope``: (access-log fields, status to abort with or None, message).

        A token bound to a session (its ``sid`` claim) is accepted only for calls
        of that session (``x-session-id``), so a leaked or guessed session ID is
        worthless without that session's token.

        Synchronous on purpose: an allowed call (verified tokens are cached per
        token string, expiry checked on every use) costs no coroutine.
        """
        if self._verifier is None:
            return _denied("no_verifier"), grpc.StatusCode.UNAUTHENTICATED, "this server cannot verify tokens"
        header = _find(metadata, AUTHORIZATION_METADATA_KEY)
        if not header:
            return (
                _denied("missing"),
                grpc.StatusCode.UNAUTHENTICATED,
                f"missing '{AUTHORIZATION_METADATA_KEY}: Bearer <token>' metadata (scope {scope!r} required)",
            )
        kind, _, token = header.partition(" ")
        token = token.strip()
        if kind.lower() != "bearer" or not token:
            return (
                _denied("malformed"),
                grpc.StatusCode.UNAUTHENTICATED,
                "authorization metadata must be 'Bearer <token>'",
            )
        try:
            claims = self._verifier.verify(token)
        except InvalidTokenError as exc:
            return _denied(exc.reason), grpc.StatusCode.UNAUTHENTICATED, exc.message
        if scope not in claims.scopes:
            return (
                _denied("missing_scope", claims.client_id),
                grpc.StatusCode.PERMISSION_DENIED,
                f"token of client {claims.client_id!r} lacks the required scope {scope!r}",
            )
        call_session = _find(metadata, SESSION_METADATA_KEY)
        if claims.session_id and not call_session:
            return (
                _denied("no_session", claims.client_id),
                grpc.StatusCode.INVALID_ARGUMENT,
                "missing 'x-session-id' call metadata (the token is bound to a session)",
            )
        if claims.session_id and claims.session_id != call_session:
            return (
                _denied("other_session", claims.client_id),
                grpc.StatusCode.PERMISSION_DENIED,
                "token is bound to another session than this call's 'x-session-id'",
            )
        CALLER.set(claims)
        return {"auth": "ok", "client": claims.client_id}, None, ""

    def _log(
        self,
        method: str,
        context: grpc.aio.ServicerContext[Any, Any],
        metadata: Iterable[Any],
        started: float,
        auth: dict[str, str],
        code: grpc.StatusCode | None,
        counted: MethodMetrics | None,
        span: Span | None,
    ) -> None:
        """Write the access-log line; count the call and end its span (the same code and time for all three)."""
        if code is None:
            code = context.code() or grpc.StatusCode.OK
        if not isinstance(code, grpc.StatusCode):  # grpc hands back a plain value in a few corner cases
            code = _STATUS_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
        seconds = time.perf_counter() - started
        if counted is not None:
            counted.end(code, seconds)
        if span is not None:
            _end_span(span, code, context, auth)
        record: dict[str, object] = {
            "method": method,
            "code": code.name,
            "ms": round(seconds * 1000.0, 3),
            "peer": context.peer(),
            "session": _field(_find(metadata, SESSION_METADATA_KEY)),
            "trace": trace_id(_find(metadata, TRACEPARENT_METADATA_KEY)),
        }
        call_id = _find(metadata, CALL_ID_METADATA_KEY)
        if call_id:  # a tool call the orchestrator recorded first: the audit's tool_calls.call_id
            record["call"] = _field(call_id)
        relayed_for = _find(metadata, ON_BEHALF_OF_METADATA_KEY)
        if relayed_for:  # a relaying caller (the MCP gateway) names the client it calls for
            record["on_behalf_of"] = _field(relayed_for)
        record.update(auth)
        self._access_log.add(record)

    async def _internal(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        log.exception("unexpected error in %s", method)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method} (see the server log)")

    def _wrap_unary(
        self,
        method: str,
        scope: str | None,
        behavior: Callable[..., Any],
        counted: MethodMetrics | None,
        tracer: Tracer | None,
    ) -> Callable[..., Any]:
        if tracer is not None:
            return self._wrap_unary_traced(method, scope, behavior, counted, tracer)

        async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            if counted is not None:
                counted.begin()
            metadata = call_metadata(context)
            auth: dict[str, str] = {}
            code: grpc.StatusCode | None = None
            try:
                if scope is not None:
                    auth, denied, message = self._check(scope, metadata)
                    if denied is not None:
                        await context.abort(denied, message)
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                await self._internal(method, context)
            finally:
                self._log(method, context, metadata, started, auth, code, counted, None)

        return wrapped

    def _wrap_unary_traced(
        self,
        method: str,
        scope: str | None,
        behavior: Callable[..., Any],
        counted: MethodMetrics | None,
        tracer: Tracer,
    ) -> Callable[..., Any]:
        """Wrap like ``_wrap_unary``, inside a SERVER span whose parent comes from the call's ``traceparent``.

        A separate function, chosen when the handler is registered, so a server
        with tracing off runs exactly the untraced wrapper above.
        """
        service, _, name = method.lstrip("/").rpartition("/")

        async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            if counted is not None:
                counted.begin()
            metadata = call_metadata(context)
            span = _server_span(tracer, service, name, metadata, context)
            auth: dict[str, str] = {}
            code: grpc.StatusCode | None = None
            try:
                with use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
                    if scope is not None:
                        auth, denied, message = self._check(scope, metadata)
                        if denied is not None:
                            await context.abort(denied, message)
                    return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                code = grpc.StatusCode.INTERNAL
                span.record_exception(exc)
                await self._internal(method, context)
            finally:
                self._log(method, context, metadata, started, auth, code, counted, span)

        return wrapped

    def _wrap_streaming(
        self,
        method: str,
        scope: str | None,
        behavior: Callable[..., Any],
        counted: MethodMetrics | None,
        tracer: Tracer | None,
    ) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behavior):
            service, _, name = method.lstrip("/").rpartition("/")

            async def wrapped_gen(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                started = time.perf_counter()
                if counted is not None:
                    counted.begin()
                metadata = call_metadata(context)
                # No current-span context here: a context attached across yields would be detached in another one.
                span = _server_span(tracer, service, name, metadata, context) if tracer is not None else None
                auth: dict[str, str] = {}
                code: grpc.StatusCode | None = None
                try:
                    if scope is not None:
                        auth, denied, message = self._check(scope, metadata)
                        if denied is not None:
                            await context.abort(denied, message)
                    async for response in behavior(request, context):
                        if counted is not None:
                            counted.message_sent()
                        yield response
                except grpc.aio.AbortError:
                    raise
                except (asyncio.CancelledError, GeneratorExit):
                    code = grpc.StatusCode.CANCELLED
                    raise
                except Exception:
                    code = grpc.StatusCode.INTERNAL
                    await self._internal(method, context)
                finally:
                    self._log(method, context, metadata, started, auth, code, counted, span)

            return wrapped_gen
        return self._wrap_unary(method, scope, behavior, counted, tracer)


_STATUS_BY_VALUE: dict[object, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def _server_span(
    tracer: Tracer, service: str, method: str, metadata: tuple[Any, ...], context: grpc.aio.ServicerContext[Any, Any]
) -> Span:
    """Start the SERVER span of one call, child of the caller's span when its ``traceparent`` is valid."""
    parent = PROPAGATOR.extract(metadata, getter=METADATA_GETTER)
    attributes: dict[str, str] = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    session = _find(metadata, SESSION_METADATA_KEY)
    if session:
        attributes["heist.session_id"] = _field(session)
    agent = baggage.get_baggage(AGENT_BAGGAGE_KEY, parent)
    if agent:
        attributes["heist.agent"] = _field(str(agent))
    peer = context.peer()
    if peer:
        attributes["network.peer.address"] = peer
    return tracer.start_span(f"{service}/{method}", context=parent, kind=SpanKind.SERVER, attributes=attributes)


def _end_span(
    span: Span, code: grpc.StatusCode, context: grpc.aio.ServicerContext[Any, Any], auth: dict[str, str]
) -> None:
    """Record the call's outcome on its span and end it."""
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if "client" in auth:
        span.set_attribute("heist.client", auth["client"])
    if "reason" in auth:
        span.set_attribute("heist.auth_denied", auth["reason"])
    if code in SERVER_ERROR_CODES:
        details = context.details()
        message = details.decode("utf-8", "replace") if isinstance(details, bytes) else str(details or code.name)
        span.set_status(Status(StatusCode.ERROR, message[:FIELD_LIMIT]))
    span.end()


if TYPE_CHECKING:
    _GenericHandler = grpc.GenericRpcHandler[Any, Any]
else:  # grpc's runtime class is not generic; only its type stubs are
    _GenericHandler = grpc.GenericRpcHandler


class _WrappedGenericHandler(_GenericHandler):
    """A generic handler whose method handlers come back wrapped by ``CallMiddleware``."""

    def __init__(self, inner: grpc.GenericRpcHandler[Any, Any], handlers: CallMiddleware) -> None:
        self._inner = inner
        self._handlers = handlers

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        return self._handlers.wrapped(handler_call_details.method, handler)


class _UnknownMethods(_GenericHandler):
    """Answers any method (registered last, it sees only those no servicer has): UNIMPLEMENTED, counted, logged."""

    def __init__(self, handlers: CallMiddleware) -> None:
        self._handlers = handlers

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str | bytes = handler_call_details.method
        return self._handlers.unimplemented(method.decode("utf-8", "replace") if isinstance(method, bytes) else method)


class WrappingRegistrar:
    """Stands in for the server when servicers register: every handler is registered wrapped."""

    def __init__(self, server: grpc.aio.Server, handlers: CallMiddleware) -> None:
        self._server = server
        self._handlers = handlers

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler[Any, Any]]) -> None:
        """Register generic handlers, wrapped."""
        self._server.add_generic_rpc_handlers(
            tuple(_WrappedGenericHandler(handler, self._handlers) for handler in generic_rpc_handlers)
        )

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """Register the pre-registered methods of ``service_name``, wrapped."""
        self._server.add_registered_method_handlers(  # type: ignore[attr-defined]
            service_name,
            {
                name: self._handlers.wrapped(f"/{service_name}/{name}", handler)
                for name, handler in method_handlers.items()
            },
        )
