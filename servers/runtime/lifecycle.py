"""A heist server's lifecycle, the same for every service: a server module is "servicer + limits".

``start_service(name, config)`` finds ``servers/<name>.py`` by convention, validates
its ``limits`` section with the module's own ``Limits`` model, and serves its
servicer with what every service gets alike: grpc.health.v1 (NOT_SERVING until
started and again while draining), server reflection (so grpcurl needs no
.proto files), the per-call middleware (``servers.runtime.middleware``), and
SIGTERM/SIGINT handling with a grace period. A service that depends on
something outside its process (the memory service on Redis) hands in a
``HealthProbe``: its health follows the probe while it runs. ``main`` is the process entry point
behind ``python -m servers.<name>``. When ``services.<name>.metrics_address`` is
set, the server also serves Prometheus metrics there (``servers.runtime.metrics``); when
the standard ``OTEL_EXPORTER_OTLP_*`` variables are set, it exports a span per
call over OTLP (``heist_common.telemetry``). When ``services.<name>.health_address`` is set,
a second, plaintext server there answers only grpc.health.v1 from the same ``HealthServicer``
(so both ports report the same statuses): the kubelet's gRPC probes cannot present a client
certificate, and the API port keeps requiring one.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import logging
import resource
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import _async as reflection_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from pydantic import BaseModel, ConfigDict, ValidationError

from heist_common import tls
from heist_common.config import (
    ConfigError,
    HeistConfig,
    ServerConfig,
    format_validation_error,
    load_config,
    split_address,
)
from heist_common.contract import ContractError, ServiceContract, contract_of
from heist_common.credentials import CredentialsError
from heist_common.exit_codes import ExitCode
from heist_common.layout import use_private_umask
from heist_common.telemetry import Telemetry, setup_tracing
from servers.auth import credential_store
from servers.auth.tokens import TokenVerifier
from servers.runtime.metrics import MetricsEndpoint, ServerMetrics
from servers.runtime.middleware import AccessLog, CallMiddleware, WrappingRegistrar
from servers.runtime.request_guard import guarded_registration

log = logging.getLogger("heist.server")

DRAIN_NOTICE_S = 0.5
"""How long a draining server keeps accepting calls after reporting NOT_SERVING (at most half the grace)."""
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Limits(BaseModel):
    """Base of every service's ``Limits`` model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class HealthProbe:
    """A service's own readiness check, run every ``interval_s`` while it serves.

    ``check`` returns None when the service can do its work, else why not (one
    line, logged when the status changes). grpc.health.v1 reports NOT_SERVING
    while it fails, and Watch subscribers hear of every change. A check that
    takes longer than ``interval_s`` counts as failed.
    """

    check: Callable[[], Awaitable[str | None]]
    interval_s: float = 1.0


@dataclass(frozen=True)
class ServiceDefinition:
    """What a service module hands the lifecycle: its servicer, and what to do after the server stopped."""

    name: str
    servicer: object
    on_stop: Callable[[], Awaitable[None]] | None = None
    collectors: tuple[Any, ...] = field(default=())
    """The service's own Prometheus metrics (``prometheus_client`` collectors, created with ``registry=None``);
    registered beside the gRPC series when the server has a metrics address."""
    health_probe: HealthProbe | None = None
    """What grpc.health.v1 follows beyond "the process listens" (None: SERVING while it runs)."""
    on_start: Callable[[], Awaitable[None]] | None = None
    """Run in the server's event loop once it is bound, before it takes calls (open what it shares)."""

    @property
    def contract(self) -> ServiceContract:
        """The service's generated contract (``heist.<name>.v1``)."""
        return contract_of(self.name)


def service_module(name: str) -> ModuleType:
    """Import ``servers.<name>``; ContractError (naming the file) if there is none."""
    try:
        return importlib.import_module(f"servers.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"servers.{name}":
            raise
        raise ContractError(f"service {name!r}: no module servers/{name}.py or package servers/{name}/") from None


def service_limits(name: str, config: HeistConfig) -> Limits:
    """Validate ``services.<name>.limits`` with the service's own ``Limits`` model; ConfigError naming the key."""
    model: type[Limits] = getattr(service_module(name), "Limits", Limits)
    try:
        return model.model_validate(config.service(name).limits)
    except ValidationError as exc:
        raise ConfigError(
            format_validation_error(exc, str(config.config_path), ("services", name, "limits"))
        ) from None


def service_definition(name: str, config: HeistConfig) -> ServiceDefinition:
    """Build the servicer of the configured service ``name``."""
    module = service_module(name)
    definition: ServiceDefinition = module.service_definition(config, service_limits(name, config))
    return definition


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
    metrics: MetricsEndpoint | None = None
    telemetry: Telemetry = field(default_factory=Telemetry)
    prober: asyncio.Task[None] | None = None
    health_server: grpc.aio.Server | None = None
    """The plaintext health-only server on ``health_address`` (None without one)."""
    health_address: str | None = None
    _stopped: bool = dataclasses.field(default=False, repr=False)

    @property
    def metrics_url(self) -> str | None:
        """``http://host:port/metrics`` of this server (None without a metrics address)."""
        return self.metrics.url if self.metrics is not None else None

    async def drain(self) -> None:
        """Report NOT_SERVING to health checks and watchers (load balancers stop sending calls)."""
        if self.prober is not None:
            self.prober.cancel()
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float = 0.5) -> None:
        """Drain, let in-flight calls finish for up to ``grace`` seconds, then stop. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        await self.drain()
        if self.health_server is not None:
            # Both stop together: a probe must not see SERVING from a process that no longer takes calls.
            await asyncio.gather(self.server.stop(grace), self.health_server.stop(grace))
        else:
            await self.server.stop(grace)
        if self.definition.on_stop is not None:
            await self.definition.on_stop()
        await self.access_log.stop()
        if self.metrics is not None:
            await self.metrics.stop()
        self.telemetry.shutdown()

    async def wait_for_termination(self) -> None:
        """Block until the server has stopped."""
        await self.server.wait_for_termination()


def token_verifier(config: HeistConfig) -> TokenVerifier:
    """Build the verifier servers with scoped methods use; creates dev credentials if none exist yet."""
    if not credential_store.public_key_overridden():
        credential_store.ensure_dev_credentials(config)
    public_key = credential_store.public_key(config)
    return TokenVerifier(public_key, issuer=config.oauth.issuer, audience=config.oauth.audience)


def register_servicer(contract: ServiceContract, servicer: object, server: Any) -> None:
    """Register a servicer so an unparseable request is INVALID_ARGUMENT, not UNKNOWN (unary services)."""
    methods = contract.descriptor.methods
    if any(method.client_streaming or method.server_streaming for method in methods):
        contract.add_servicer(servicer, server)
    else:
        guarded_registration(contract.descriptor)(servicer, server)


async def run_probe(name: str, probe: HealthProbe) -> str | None:
    """One probe, bounded by its interval; None if healthy, else why not."""
    try:
        return await asyncio.wait_for(probe.check(), probe.interval_s)
    except TimeoutError:
        return f"its health probe did not answer within {probe.interval_s:g} s"
    except Exception as exc:  # a broken probe makes the service unhealthy, it does not stop the probing
        log.error("%s: health probe failed: %s: %s", name, type(exc).__name__, exc)
        return f"its health probe failed: {type(exc).__name__}"


async def set_health(health: HealthServicer, services: Sequence[str], reason: str | None) -> None:
    """Set SERVING (reason None) or NOT_SERVING for every name the server answers health checks for."""
    for service in services:
        await health.set(service, SERVING if reason is None else NOT_SERVING)


async def follow_probe(
    name: str, probe: HealthProbe, health: HealthServicer, services: Sequence[str], reason: str | None
) -> None:
    """Probe every ``interval_s`` and move health along; ``reason`` is the status already set (None: SERVING)."""
    while True:
        await asyncio.sleep(probe.interval_s)
        now = await run_probe(name, probe)
        if (now is None) == (reason is None):
            continue
        await set_health(health, services, now)
        if now is None:
            log.info("%s: SERVING again: its health probe passes", name)
        else:
            log.warning("%s: NOT_SERVING: %s", name, now)
        reason = now


def server_options(bounds: ServerConfig) -> list[tuple[str, int]]:
    """GRPC's own channel arguments for ``services.<name>.server`` (see ``ServerConfig``)."""
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.max_allowed_incoming_connections", bounds.max_connections),
        ("grpc.max_concurrent_streams", bounds.max_concurrent_streams),
        ("grpc.server_handshake_timeout_ms", int(bounds.handshake_timeout_s * 1000)),
        ("grpc.max_connection_idle_ms", int(bounds.max_connection_idle_s * 1000)),
        ("grpc.max_connection_age_ms", int(bounds.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", 10_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", int(bounds.min_ping_interval_s * 1000)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_receive_message_length", bounds.max_receive_bytes),
    ]


HEALTH_SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_allowed_incoming_connections", 16),
    ("grpc.max_concurrent_streams", 16),
    ("grpc.server_handshake_timeout_ms", 5_000),
    ("grpc.max_connection_idle_ms", 60_000),
    ("grpc.max_receive_message_length", 4096),
]
"""The health port's own bounds: it answers a few probes, never a client's load."""


async def start_health_server(health: HealthServicer, address: str) -> tuple[grpc.aio.Server, str]:
    """Serve ``health`` alone, in plaintext, on ``address``; return the server and the address it bound.

    Nothing else is registered (no reflection, no tool): the port is unauthenticated, so it
    must tell a caller no more than whether the service is up.
    """
    host, _ = split_address(address)
    server = grpc.aio.server(options=HEALTH_SERVER_OPTIONS, maximum_concurrent_rpcs=16)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {address} for health checks (port in use?)")
    await server.start()
    return server, f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def raise_open_file_limit(wanted: int = 65_536) -> int:
    """Raise this process's soft descriptor limit towards the hard one, so connection caps bind first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


async def start(
    definition: ServiceDefinition,
    config: HeistConfig,
    address: str,
    *,
    log_stream: Any = None,
    metrics_address: str | None = None,
    health_address: str | None = None,
) -> RunningServer:
    """Start ``definition`` on ``address`` in the running event loop; SERVING once it listens.

    ``metrics_address`` overrides ``services.<name>.metrics_address`` and ``health_address``
    ``services.<name>.health_address`` (port 0: any free port).
    """
    host, _ = split_address(address)
    contract = definition.contract
    scopes = contract.scopes_by_method_path()
    verifier = token_verifier(config) if contract.scopes else None
    access_log = AccessLog(definition.name, log_stream)
    settings = config.service(definition.name)
    bounds = settings.server
    metrics_address = metrics_address or settings.metrics_address
    health_address = health_address or settings.health_address
    metrics = ServerMetrics(definition.name, definition.collectors) if metrics_address else None
    telemetry = setup_tracing(f"heist-{definition.name}")
    server = grpc.aio.server(options=server_options(bounds), maximum_concurrent_rpcs=bounds.max_concurrent_rpcs)
    middleware = CallMiddleware(access_log, scopes, verifier, metrics, telemetry.tracer)
    registrar: Any = WrappingRegistrar(server, middleware)
    register_servicer(contract, definition.servicer, registrar)

    health = HealthServicer()
    for service in ("", contract.full_name):
        await health.set(service, NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, registrar)
    reflected = [contract.full_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME]  # fmt: skip
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection_aio.ReflectionServicer(reflected), registrar)
    server.add_generic_rpc_handlers((middleware.unknown_methods(),))  # last: only methods nobody else has
    server_credentials = None
    if tls.mtls(config):  # before the bind: a missing certificate is not a busy port
        credential_store.ensure_dev_tls(config)
        server_credentials = tls.server_credentials(config, definition.name)
    try:
        if server_credentials is not None:
            port = server.add_secure_port(address, server_credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        telemetry.shutdown()
        raise OSError(f"{definition.name}: cannot listen on {address} (port in use?)")
    endpoint = None
    health_server = None
    health_bound = None
    try:
        if metrics is not None and metrics_address:
            endpoint = await MetricsEndpoint.start(
                metrics.registry,
                metrics_address,
                max_connections=bounds.metrics_max_connections,
                timeout_s=bounds.metrics_timeout_s,
            )
        if health_address:
            health_server, health_bound = await start_health_server(health, health_address)
    except OSError as exc:
        telemetry.shutdown()
        await server.stop(None)
        if endpoint is not None:
            await endpoint.stop()
        raise OSError(f"{definition.name}: {exc}") from None
    if definition.on_start is not None:
        try:
            await definition.on_start()
        except BaseException:
            telemetry.shutdown()
            await server.stop(None)
            if endpoint is not None:
                await endpoint.stop()
            if health_server is not None:
                await health_server.stop(None)
            raise
    await server.start()
    access_log.start()
    services = ("", contract.full_name)
    prober = None
    reason = None
    if definition.health_probe is not None:
        reason = await run_probe(definition.name, definition.health_probe)
        if reason is not None:
            log.warning("%s: NOT_SERVING: %s", definition.name, reason)
        follow = follow_probe(definition.name, definition.health_probe, health, services, reason)
        prober = asyncio.get_running_loop().create_task(follow, name=f"{definition.name}-health-probe")
    await set_health(health, services, reason)
    bound = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    log.info("%s listening on %s (%s)", definition.name, bound, config.security.transport)
    if endpoint is not None:
        log.info("%s metrics on %s", definition.name, endpoint.url)
    if health_bound is not None:
        log.info("%s health checks (plaintext, grpc.health.v1 only) on %s", definition.name, health_bound)
    if telemetry.enabled:
        log.info("%s exports spans over OTLP", definition.name)
    return RunningServer(
        definition.name, bound, port, server, health, access_log, definition, endpoint, telemetry, prober,
        health_server, health_bound,
    )  # fmt: skip


async def start_service(
    name: str,
    config: HeistConfig,
    address: str = "127.0.0.1:0",
    *,
    log_stream: Any = None,
    metrics_address: str | None = None,
    health_address: str | None = None,
) -> RunningServer:
    """Start the configured service ``name`` in the running event loop (tests, benchmarks, embedding).

    ``address`` defaults to an ephemeral port; ``RunningServer.address`` and
    ``.port`` tell the real one. ``log_stream`` receives the access-log lines
    (default: stderr). Stop it with ``await server.stop(grace)``.
    """
    return await start(
        service_definition(name, config),
        config,
        address,
        log_stream=log_stream,
        metrics_address=metrics_address,
        health_address=health_address,
    )


def parse_args(service_name: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``--config PATH [--address HOST:PORT] [--host H] [--port P] [--grace S]``."""
    parser = argparse.ArgumentParser(
        prog=f"python -m servers.{service_name}", description=f"Run the {service_name} service."
    )
    parser.add_argument("--config", default="config/heist.yaml", help="mesh config file (default: %(default)s)")
    parser.add_argument("--address", help="HOST:PORT to listen on (default: from the config)")
    parser.add_argument("--host", help="override the host part of the address")
    parser.add_argument("--port", type=int, help="override the port part of the address")
    parser.add_argument("--grace", type=float, help="seconds in-flight calls get on shutdown (default: config)")
    parser.add_argument(
        "--metrics-address", help="HOST:PORT for Prometheus metrics (default: services.<name>.metrics_address)"
    )
    parser.add_argument(
        "--health-address",
        help="HOST:PORT for plaintext grpc.health.v1 only (default: services.<name>.health_address)",
    )
    return parser.parse_args(argv)


def resolve_address(config: HeistConfig, service_name: str, args: argparse.Namespace) -> str:
    """Combine the config's address with ``--address``/``--host``/``--port`` overrides."""
    host, port = split_address(args.address or config.service(service_name).address)
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
    definition: ServiceDefinition,
    config: HeistConfig,
    address: str,
    grace_s: float,
    metrics_address: str | None = None,
    health_address: str | None = None,
) -> None:
    """Run one service until SIGTERM/SIGINT, then drain and stop within ``grace_s``."""
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    running = await start(definition, config, address, metrics_address=metrics_address, health_address=health_address)
    await stop_requested.wait()
    log.info("%s: stop requested, draining for up to %.1f s", definition.name, grace_s)
    # NOT_SERVING first, still accepting calls while health watchers (client-side load balancers)
    # move away; only then refuse new calls, so a replica going away costs its callers nothing.
    await running.drain()
    await asyncio.sleep(min(DRAIN_NOTICE_S, grace_s / 2))
    await running.stop(grace_s)
    log.info("%s: stopped", definition.name)


def main(module_spec: Any, argv: Sequence[str] | None = None) -> int:
    """Process entry point of every ``python -m servers.<name>`` (pass the module's ``__spec__``).

    A service is a module ``servers/<name>.py`` or a package ``servers/<name>/`` whose ``__main__`` calls this.
    """
    service_name = str(module_spec.name).removesuffix(".__main__").rpartition(".")[2]
    args = parse_args(service_name, argv)
    use_private_umask()  # what a service writes (credentials, the bank database) and its query workers
    configure_logging()
    try:
        config = load_config(args.config)
        config.mesh.make_private()
        address = resolve_address(config, service_name, args)
        for side_address in (args.metrics_address, args.health_address):
            if side_address:
                split_address(side_address)
        definition = service_definition(service_name, config)
    except ConfigError as exc:
        log.error("%s", exc)
        return ExitCode.CONFIG
    except (ContractError, KeyError, ValueError) as exc:
        log.error("%s: %s", service_name, exc)
        return ExitCode.CONFIG
    grace_s = args.grace if args.grace is not None else config.mesh.shutdown_grace_s
    raise_open_file_limit()
    try:
        asyncio.run(
            serve_until_signalled(
                definition, config, address, grace_s, args.metrics_address, args.health_address
            )
        )
    except (OSError, CredentialsError) as exc:
        log.error("%s: %s", service_name, exc)
        return ExitCode.FAILED
    return ExitCode.OK
