"""Per-call middleware every heist server gets: access log, bearer-token auth, last-resort error mapping.

Kept apart from the server's lifecycle (``servers.lifecycle``): this is what
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

from heist_common.contract import AUTHORIZATION_METADATA_KEY, SESSION_METADATA_KEY, TRACEPARENT_METADATA_KEY
from servers.tokens import InvalidTokenError, TokenClaims, TokenVerifier

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

    def __init__(self, access_log: AccessLog, scopes: dict[str, str | None], verifier: TokenVerifier | None) -> None:
        self._access_log = access_log
        self._scopes = scopes
        self._verifier = verifier
        self._cache: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def wrapped(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        """Return ``handler`` of ``method`` (a ``/package.Service/Method`` path) wrapped; cached per method."""
        cached = self._cache.get(method)
        if cached is None:
            cached = self._wrap(method, handler)
            self._cache[method] = cached
        return cached

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        scope = self._scopes.get(method)
        deserializer = handler.request_deserializer
        serializer = handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, scope, handler.unary_unary), deserializer, serializer
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_streaming(method, scope, handler.unary_stream), deserializer, serializer
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(method, scope, handler.stream_unary), deserializer, serializer
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_streaming(method, scope, handler.stream_stream), deserializer, serializer
            )
        return handler

    def _check(
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
    ) -> None:
        if code is None:
            code = context.code() or grpc.StatusCode.OK
        record: dict[str, object] = {
            "method": method,
            "code": code.name if isinstance(code, grpc.StatusCode) else str(code),
            "ms": round((time.perf_counter() - started) * 1000.0, 3),
            "peer": context.peer(),
            "session": _field(_find(metadata, SESSION_METADATA_KEY)),
            "trace": trace_id(_find(metadata, TRACEPARENT_METADATA_KEY)),
        }
        record.update(auth)
        self._access_log.add(record)

    async def _internal(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        log.exception("unexpected error in %s", method)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method} (see the server log)")

    def _wrap_unary(self, method: str, scope: str | None, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
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
                self._log(method, context, metadata, started, auth, code)

        return wrapped

    def _wrap_streaming(self, method: str, scope: str | None, behavior: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behavior):

            async def wrapped_gen(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                started = time.perf_counter()
                metadata = call_metadata(context)
                auth: dict[str, str] = {}
                code: grpc.StatusCode | None = None
                try:
                    if scope is not None:
                        auth, denied, message = self._check(scope, metadata)
                        if denied is not None:
                            await context.abort(denied, message)
                    async for response in behavior(request, context):
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
                    self._log(method, context, metadata, started, auth, code)

            return wrapped_gen
        return self._wrap_unary(method, scope, behavior)


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
