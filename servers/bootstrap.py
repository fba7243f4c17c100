"""The one server bootstrap every heist service uses: a server module is "servicer + bootstrap call".

It adds, for every service alike: grpc.health.v1 (NOT_SERVING until started and
again while draining), server reflection (so grpcurl needs no .proto files),
one access-log line per call, bearer-token auth for methods whose contract
carries ``heist.auth.v1.required_scope``, a last-resort mapping of unexpected
exceptions to INTERNAL, and SIGTERM/SIGINT handling with a grace period.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import _async as reflection_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from servers import credentials
from servers.contract import (
    AUTHORIZATION_METADATA_KEY,
    SESSION_METADATA_KEY,
    TRACEPARENT_METADATA_KEY,
    scopes_by_method_path,
)
from servers.settings import ConfigError, MeshSettings, load_mesh_settings, split_address
from servers.tokens import InvalidTokenError, TokenVerifier

log = logging.getLogger("heist.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class ServiceDefinition:
    """What a service module hands the bootstrap: its servicer and how to register it."""

    name: str
    descriptor: ServiceDescriptor
    servicer: object
    register: Callable[[Any, grpc.aio.Server], None]
    on_stop: Callable[[], Awaitable[None]] | None = None


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

    def add(self, line: str) -> None:
        """Queue one line (the timestamp is taken now; formatted once per second)."""
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._prefix = f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(now))} {self._service} "
        self._lines.append(f"{self._prefix}{line}\n")

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


def metadata_value(context: grpc.aio.ServicerContext[Any, Any], key: str) -> str:
    """Return one call metadata value ('' if absent)."""
    return _find(context.invocation_metadata() or (), key)


def _find(metadata: Iterable[Any], key: str) -> str:
    for item in metadata:
        if item[0] == key:
            value = item[1]
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return ""


def session_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """Return the heist session id of the call ('' if the caller sent none)."""
    return metadata_value(context, SESSION_METADATA_KEY)


class MeshHandlers:
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
    ) -> tuple[str, grpc.StatusCode | None, str]:
        """Check the call's bearer token for ``scope``: (access-log note, status to abort with or None, message).

        Synchronous on purpose: an allowed call (verified tokens are cached per
        token string, expiry checked on every use) costs no coroutine.
        """
        if self._verifier is None:
            return "auth=denied reason=no_verifier", grpc.StatusCode.UNAUTHENTICATED, "this server cannot verify tokens"
        header = _find(metadata, AUTHORIZATION_METADATA_KEY)
        if not header:
            return (
                "auth=denied reason=missing",
                grpc.StatusCode.UNAUTHENTICATED,
                f"missing '{AUTHORIZATION_METADATA_KEY}: Bearer <token>' metadata (scope {scope!r} required)",
            )
        kind, _, token = header.partition(" ")
        token = token.strip()
        if kind.lower() != "bearer" or not token:
            return (
                "auth=denied reason=malformed",
                grpc.StatusCode.UNAUTHENTICATED,
                "authorization metadata must be 'Bearer <token>'",
            )
        try:
            claims = self._verifier.verify(token)
        except InvalidTokenError as exc:
            return f"auth=denied reason={exc.reason}", grpc.StatusCode.UNAUTHENTICATED, exc.message
        if scope not in claims.scopes:
            return (
                f"auth=denied reason=missing_scope client={claims.client_id}",
                grpc.StatusCode.PERMISSION_DENIED,
                f"token of client {claims.client_id!r} lacks the required scope {scope!r}",
            )
        return f"auth=ok client={claims.client_id}", None, ""

    def _log(
        self,
        method: str,
        context: grpc.aio.ServicerContext[Any, Any],
        metadata: Iterable[Any],
        started: float,
        auth: str,
        code: grpc.StatusCode | None,
    ) -> None:
        if code is None:
            code = context.code() or grpc.StatusCode.OK
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        session = _find(metadata, SESSION_METADATA_KEY) or "-"
        trace = _find(metadata, TRACEPARENT_METADATA_KEY)[3:35] or "-"  # the trace ID of 00-<trace>-<span>-01
        line = f"method={method} code={name} ms={elapsed_ms:.2f} peer={context.peer()} session={session} trace={trace}"
        self._access_log.add(f"{line} {auth}" if auth else line)

    async def _internal(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        log.exception("unexpected error in %s", method)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method} (see the server log)")

    def _wrap_unary(self, method: str, scope: str | None, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            metadata = context.invocation_metadata() or ()
            auth = ""
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
                metadata = context.invocation_metadata() or ()
                auth = ""
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
    """A generic handler whose method handlers come back wrapped by ``MeshHandlers``."""

    def __init__(self, inner: grpc.GenericRpcHandler[Any, Any], handlers: MeshHandlers) -> None:
        self._inner = inner
        self._handlers = handlers

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        return self._handlers.wrapped(handler_call_details.method, handler)


class WrappingRegistrar:
    """Stands in for the server when servicers register: every handler is registered wrapped."""

    def __init__(self, server: grpc.aio.Server, handlers: MeshHandlers) -> None:
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


@dataclass
class RunningServer:
    """A started server: where it listens and how to drain and stop it."""

    name: str
    address: str
    port: int
    server: grpc.aio.Server
    health: HealthServicer
    access_log: AccessLog
    definition: ServiceDefinition
    _stopped: bool = dataclasses.field(default=False, repr=False)

    async def drain(self) -> None:
        """Report NOT_SERVING to health checks and watchers (load balancers stop sending calls)."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float = 0.5) -> None:
        """Drain, let in-flight calls finish for up to ``grace`` seconds, then stop. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        await self.drain()
        await self.server.stop(grace)
        if self.definition.on_stop is not None:
            await self.definition.on_stop()
        await self.access_log.stop()

    async def wait_for_termination(self) -> None:
        """Block until the server has stopped."""
        await self.server.wait_for_termination()


def token_verifier(settings: MeshSettings) -> TokenVerifier:
    """Build the verifier tool servers use; creates dev credentials if none exist yet."""
    if not credentials.public_key_overridden():
        credentials.ensure_dev_credentials(settings)
    return TokenVerifier(
        credentials.public_key(settings), issuer=settings.oauth.issuer, audience=settings.oauth.audience
    )


async def start(
    definition: ServiceDefinition,
    settings: MeshSettings,
    address: str,
    *,
    log_stream: Any = None,
) -> RunningServer:
    """Start ``definition`` on ``address`` in the running event loop; SERVING once it listens."""
    host, _ = split_address(address)
    scopes = scopes_by_method_path(definition.descriptor)
    needs_auth = any(scope is not None for scope in scopes.values())
    verifier = token_verifier(settings) if needs_auth else None
    access_log = AccessLog(definition.name, log_stream)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    registrar: Any = WrappingRegistrar(server, MeshHandlers(access_log, scopes, verifier))
    definition.register(definition.servicer, registrar)

    health = HealthServicer()
    for service in ("", definition.descriptor.full_name):
        await health.set(service, NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, registrar)
    reflected = [definition.descriptor.full_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection_aio.ReflectionServicer(reflected), registrar)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"{definition.name}: cannot listen on {address} (port in use?)")
    await server.start()
    access_log.start()
    for service in ("", definition.descriptor.full_name):
        await health.set(service, SERVING)
    bound = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    log.info("%s listening on %s", definition.name, bound)
    return RunningServer(definition.name, bound, port, server, health, access_log, definition)


def parse_args(service_name: str, settings_argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``--config PATH [--address HOST:PORT] [--host H] [--port P] [--grace S]``."""
    parser = argparse.ArgumentParser(
        prog=f"python -m servers.{service_name}", description=f"Run the {service_name} service."
    )
    parser.add_argument("--config", default="config/heist.yaml", help="mesh config file (default: %(default)s)")
    parser.add_argument("--address", help="HOST:PORT to listen on (default: from the config)")
    parser.add_argument("--host", help="override the host part of the address")
    parser.add_argument("--port", type=int, help="override the port part of the address")
    parser.add_argument("--grace", type=float, help="seconds in-flight calls get on shutdown (default: config)")
    return parser.parse_args(settings_argv)


def resolve_address(settings: MeshSettings, service_name: str, args: argparse.Namespace) -> str:
    """Combine the config's address with ``--address``/``--host``/``--port`` overrides."""
    host, port = split_address(args.address or settings.address(service_name))
    if args.host:
        host = args.host
    if args.port is not None:
        port = args.port
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def configure_logging() -> None:
    """Log to stderr (the supervisor redirects it to ``<run_dir>/log/<name>.log``)."""
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


async def serve_until_signalled(
    service_name: str, factory: Callable[[MeshSettings], ServiceDefinition], settings: MeshSettings, address: str,
    grace_s: float,
) -> None:
    """Run one service until SIGTERM/SIGINT, then drain and stop within ``grace_s``."""
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    running = await start(factory(settings), settings, address)
    await stop_requested.wait()
    log.info("%s: stop requested, draining for up to %.1f s", service_name, grace_s)
    await running.stop(grace_s)
    log.info("%s: stopped", service_name)


def main(service_name: str, factory: Callable[[MeshSettings], ServiceDefinition],
         argv: Sequence[str] | None = None) -> int:
    """Process entry point shared by every ``python -m servers.<name>``; returns the exit code."""
    args = parse_args(service_name, argv)
    configure_logging()
    try:
        settings = load_mesh_settings(args.config)
        address = resolve_address(settings, service_name, args)
    except (ConfigError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    grace_s = args.grace if args.grace is not None else settings.shutdown_grace_s
    try:
        asyncio.run(serve_until_signalled(service_name, factory, settings, address, grace_s))
    except OSError as exc:
        log.error("%s: %s", service_name, exc)
        return 1
    return 0
