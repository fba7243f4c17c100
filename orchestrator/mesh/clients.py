"""gRPC side of the orchestrator: one channel per service, circuit breakers, typed clients.

Why this shape: channels are expensive to set up and cheap to reuse, so each
service gets exactly one ``grpc.aio`` channel for the life of the mesh, over all
its replicas (``round_robin`` with client-side health checking, so a dead or
draining replica gets no calls) and mutual TLS unless ``security.transport`` is
``plaintext``. Retries
on UNAVAILABLE are gRPC's own (``retryPolicy`` in the channel's service config);
on top of that a pybreaker circuit per service stops hammering a service that
is down and lets one trial call through after the cool-down. Every failure
becomes a ``ServiceCallError`` carrying service, operation, status code,
message and latency, which the agent turns into an audit event.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from heist.memory.v1 import memory_pb2, memory_pb2_grpc
from heist.oauth.v1 import oauth_pb2, oauth_pb2_grpc
from opentelemetry.trace import Tracer

from heist_common import tls
from heist_common.config import CircuitBreakerConfig, GrpcRetryConfig, HeistConfig, split_address
from heist_common.contract import (
    AUTHORIZATION_METADATA_KEY,
    SESSION_METADATA_KEY,
    Catalogue,
    contract_of,
)
from heist_common.credentials import CredentialsError, client_secret
from heist_common.tools.registry import ToolRegistry
from orchestrator.tracing import current_turn, elapsed_ms, end_span, step_kind

if TYPE_CHECKING:
    import pybreaker

    from heist_common.audit import EventRow

__all__ = [
    "CIRCUIT_OPEN",
    "GuardedService",
    "HealthResult",
    "MemoryClient",
    "ServiceCallError",
    "ServiceClients",
    "TokenProvider",
    "channel_target",
    "retry_service_config",
]

T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]
CIRCUIT_OPEN = "CIRCUIT_OPEN"
"""Status code recorded for calls the circuit breaker refused to make."""

OUTAGE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)
"""Codes that say the service (not the request) is broken; only these trip a breaker."""

GRPC_CODE_VALUES = {code.name: code.value[0] for code in grpc.StatusCode}
"""Status name -> number, for the ``rpc.grpc.status_code`` span attribute."""



class ServiceCallError(Exception):
    """A failed (or refused) service call, with everything the audit needs."""

    def __init__(self, service: str, operation: str, status_code: str, detail: str, latency_ms: float) -> None:
        super().__init__(f"{service}.{operation} failed: {status_code}: {detail}")
        self.service = service
        self.operation = operation
        self.status_code = status_code
        self.detail = detail
        self.latency_ms = latency_ms

    @property
    def circuit_open(self) -> bool:
        """True when the breaker refused the call (nothing was sent)."""
        return self.status_code == CIRCUIT_OPEN

    def to_event(self, turn_id: int | None = None, agent_name: str | None = None) -> EventRow:
        """Describe this failure as an ``events`` row."""
        from heist_common.audit import EventRow  # the audit (Peewee) is loaded by whoever records events

        return EventRow(
            service=self.service,
            operation=self.operation,
            status_code=self.status_code,
            detail=self.detail,
            latency_ms=round(self.latency_ms, 3),
            turn_id=turn_id,
            agent_name=agent_name,
        )


def retry_service_config(
    grpc_services: Sequence[str], retry: GrpcRetryConfig, *, health_service: str | None = None
) -> str:
    """Service-config JSON with gRPC's built-in retryPolicy for UNAVAILABLE on ``grpc_services``.

    With ``health_service``, also ``round_robin`` over every resolved address
    with client-side health checking: gRPC watches grpc.health.v1 for that name
    on each replica and only picks the ones reporting SERVING, so a replica that
    dies or drains (NOT_SERVING on SIGTERM) stops getting calls.
    """
    balancing: dict[str, Any] = {}
    if health_service is not None:
        balancing = {
            "loadBalancingConfig": [{"round_robin": {}}],
            "healthCheckConfig": {"serviceName": health_service},
        }
    return json.dumps(
        {
            **balancing,
            "methodConfig": [
                {
                    "name": [{"service": name} for name in grpc_services],
                    "retryPolicy": {
                        "maxAttempts": retry.max_attempts,
                        "initialBackoff": f"{retry.initial_backoff_s}s",
                        "maxBackoff": f"{retry.max_backoff_s}s",
                        "backoffMultiplier": retry.backoff_multiplier,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ],
        }
    )


def channel_target(addresses: Sequence[str]) -> str:
    """Return the gRPC target for a service's replicas: the address itself, or a static ``ipv4:``/``ipv6:`` list.

    Replicas on a host name (not an IP literal) are not supported: gRPC's static
    resolvers take IP addresses only (behind DNS, let the name resolve to several).
    """
    if len(addresses) == 1:
        return addresses[0]
    hosts = [split_address(address)[0] for address in addresses]
    try:
        versions = {ipaddress.ip_address(host).version for host in hosts}
    except ValueError:
        raise ValueError(f"replicas need IP addresses, not host names: {', '.join(addresses)}") from None
    if versions == {4}:
        return "ipv4:" + ",".join(addresses)
    if versions == {6}:
        return "ipv6:" + ",".join(addresses)
    raise ValueError(f"replicas mix IPv4 and IPv6: {', '.join(addresses)}")


def _is_not_an_outage(error: BaseException) -> bool:
    """Pybreaker exclusion: request errors (bad argument, denied) prove the service is up."""
    return not (isinstance(error, grpc.aio.AioRpcError) and error.code() in OUTAGE_CODES)


def _import_pybreaker() -> None:
    """Import pybreaker without the ``redis`` package, unless this process already uses redis.

    pybreaker imports redis at import time, if installed, for its Redis-backed
    circuit storage. The orchestrator keeps its circuits in memory, and redis is
    installed only for the memory service's store; importing it (with the
    OpenTelemetry metrics SDK it pulls in) is a noticeable cost on the way to a
    run's first tool call. With ``redis`` marked missing in
    ``sys.modules`` for the duration of the import, pybreaker goes without it;
    the mark is removed at once, so a later ``import redis`` works as usual.
    """
    if "pybreaker" in sys.modules:
        return
    hide_redis = "redis" not in sys.modules
    if hide_redis:
        sys.modules["redis"] = None  # type: ignore[assignment]  # import redis -> ImportError, for pybreaker only
    try:
        import pybreaker  # noqa: F401
    finally:
        if hide_redis:
            del sys.modules["redis"]


class GuardedService:
    """One service: its channel (created once), deadline and circuit breaker."""

    def __init__(
        self,
        name: str,
        target: str,
        deadline_s: float,
        channel: grpc.aio.Channel,
        breaker_config: CircuitBreakerConfig,
        grpc_service: str = "",
    ) -> None:
        self.name = name
        self.target = target
        self.deadline_s = deadline_s
        self.channel = channel
        self._breaker_config = breaker_config
        self.grpc_service = grpc_service or name
        self._kind = step_kind(name)
        self._host, _, port = target.rpartition(":")
        self._port = int(port) if port.isdigit() else 0
        self._trial_in_flight = False

    @functools.cached_property
    def breaker(self) -> pybreaker.CircuitBreaker:
        """The service's circuit, made by the first call through it.

        Why not in ``__init__``: ``orchestrator health`` calls no RPC through a
        breaker, and must not pay for importing pybreaker (see ``_import_pybreaker``).
        """
        _import_pybreaker()
        import pybreaker

        return pybreaker.CircuitBreaker(
            fail_max=self._breaker_config.failure_threshold,
            reset_timeout=self._breaker_config.reset_timeout_s,
            exclude=[_is_not_an_outage],
            throw_new_error_on_trip=False,
            name=self.name,
        )

    @property
    def circuit_state(self) -> str:
        """``closed``, ``open`` or ``half-open``."""
        state: str = self.breaker.current_state
        return state

    async def call(self, operation: str, rpc: Callable[..., Awaitable[T]], request: Message, metadata: Metadata) -> T:
        """Invoke ``rpc`` through the breaker with the service's deadline; ServiceCallError on any failure.

        Half-open admits exactly one trial call (pybreaker alone would let every
        concurrent call through); the others are refused as if the circuit were
        open. The trial waits for the channel to reconnect, within its deadline,
        so a service restarted during the cool-down is not failed by a channel
        still backing off from the outage.
        """
        start = time.perf_counter()
        turn = current_turn()
        if turn is None:
            return await self._call(operation, rpc, request, metadata, start)
        # Inside a turn: a CLIENT span (tracing on) and a step of the turn's timeline, whatever the outcome.
        span = turn.client_span(
            f"{self.grpc_service}/{operation}",
            {"rpc.system": "grpc", "rpc.service": self.grpc_service, "rpc.method": operation,
             "server.address": self._host, "server.port": self._port},
        )  # fmt: skip
        code, detail = "OK", ""
        try:
            return await self._call(operation, rpc, request, (*metadata, *turn.outgoing(span)), start)
        except ServiceCallError as exc:
            code, detail = exc.status_code, exc.detail
            raise
        except BaseException as exc:
            code = "CANCELLED" if isinstance(exc, asyncio.CancelledError) else type(exc).__name__
            raise
        finally:
            turn.record(self._kind, f"{self.name}.{operation}", start, code)
            if span is not None:
                if code in GRPC_CODE_VALUES:
                    span.set_attribute("rpc.grpc.status_code", GRPC_CODE_VALUES[code])
                end_span(span, code, detail)

    def unsent(self, operation: str, code: str) -> None:
        """Put a call that could not be sent (no token) on the turn's timeline, a failed attempt like a circuit skip.

        Why: the session's outcome (``orchestrator.session.runner``) counts every
        call the crew tried to make; a call without a token was tried, and failed.
        """
        turn = current_turn()
        if turn is not None:
            turn.record(self._kind, f"{self.name}.{operation}", time.perf_counter(), code)

    async def _call(
        self, operation: str, rpc: Callable[..., Awaitable[T]], request: Message, metadata: Metadata, start: float
    ) -> T:
        import pybreaker  # loaded by ``breaker``; a dictionary lookup from now on

        if self._trial_in_flight:
            raise ServiceCallError(
                self.name, operation, CIRCUIT_OPEN, "circuit half-open: a trial call is in flight", elapsed_ms(start)
            )
        try:
            with self.breaker.calling():
                trial = self.breaker.current_state == pybreaker.STATE_HALF_OPEN
                self._trial_in_flight = trial
                try:
                    return await rpc(request, timeout=self.deadline_s, metadata=metadata, wait_for_ready=trial or None)
                finally:
                    if trial:
                        self._trial_in_flight = False
        except pybreaker.CircuitBreakerError:
            raise ServiceCallError(
                self.name, operation, CIRCUIT_OPEN, "circuit open: service skipped during cool-down", elapsed_ms(start)
            ) from None
        except grpc.aio.AioRpcError as exc:
            raise ServiceCallError(
                self.name, operation, exc.code().name, exc.details() or "", elapsed_ms(start)
            ) from None


@dataclass(frozen=True, slots=True)
class HealthResult:
    """One row of the health table."""

    service: str
    target: str
    status: str
    latency_ms: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        """Whether the service can be used."""
        return self.status == "SERVING"

    def to_event(self) -> EventRow:
        """Describe this health result as an ``events`` row."""
        from heist_common.audit import EventRow

        return EventRow(
            service=self.service,
            operation="health_check",
            status_code=self.status,
            detail=self.detail or self.target,
            latency_ms=round(self.latency_ms, 3),
        )


class TokenProvider:
    """OAuth client-credentials tokens, cached per agent and refreshed before they expire."""

    REFRESH_FRACTION = 0.8
    """Refresh once 80% of a token's lifetime has passed, so a token never expires mid-call."""

    def __init__(self, oauth: GuardedService, config: HeistConfig) -> None:
        self._oauth = oauth
        self._stub = oauth_pb2_grpc.OAuthServiceStub(oauth.channel)
        self._config = config
        self._cache: dict[str, tuple[str, float]] = {}
        self.issued_count = 0

    async def token(self, client_id: str, scopes: Sequence[str], metadata: Metadata) -> str:
        """Return a valid bearer token for ``client_id`` with ``scopes``; ServiceCallError if OAuth fails.

        The token is bound to the session in ``metadata`` (the OAuth server puts
        it in the token), so tokens are cached per session too.
        """
        session = next((value for key, value in metadata if key == SESSION_METADATA_KEY), "")
        key = f"{session}|{client_id}|{' '.join(scopes)}"
        cached = self._cache.get(key)
        if cached is not None and time.monotonic() < cached[1]:
            return cached[0]
        start = time.perf_counter()
        try:
            secret = client_secret(self._config, client_id)
        except CredentialsError as exc:
            raise ServiceCallError("oauth", "IssueToken", "CREDENTIALS", str(exc), elapsed_ms(start)) from None
        request = oauth_pb2.IssueTokenRequest(
            grant_type="client_credentials", client_id=client_id, client_secret=secret, scopes=list(scopes)
        )
        response = await self._oauth.call("IssueToken", self._stub.IssueToken, request, metadata)
        lifetime = max(float(response.expires_in), 0.0)
        self._cache[key] = (response.access_token, time.monotonic() + lifetime * self.REFRESH_FRACTION)
        self.issued_count += 1
        return response.access_token

    def invalidate(self, client_id: str) -> None:
        """Forget a client's tokens (after UNAUTHENTICATED, e.g. the OAuth key was rotated)."""
        for key in [k for k in self._cache if k.split("|")[1] == client_id]:
            del self._cache[key]


class MemoryClient:
    """Typed calls to MemoryService, as the orchestrator's own OAuth client, with a token bound to the session.

    The session comes from ``x-session-id`` metadata; the memory service only
    answers a token issued for that same session.
    """

    def __init__(self, memory: GuardedService, tokens: TokenProvider, client_id: str, max_store_chars: int) -> None:
        self.service = memory
        self._max_store_chars = max_store_chars
        self._stub = memory_pb2_grpc.MemoryServiceStub(memory.channel)
        self._tokens = tokens
        self._client_id = client_id
        self._scopes = contract_of("memory").scopes

    async def _authorized(self, operation: str, metadata: Metadata) -> Metadata:
        try:
            token = await self._tokens.token(self._client_id, self._scopes, metadata)
        except ServiceCallError as exc:
            self.service.unsent(operation, exc.status_code)
            detail = f"no token: {exc.detail}"
            raise ServiceCallError("memory", operation, exc.status_code, detail, exc.latency_ms) from None
        return (*metadata, (AUTHORIZATION_METADATA_KEY, f"Bearer {token}"))

    async def compressed(self, agent: str, recent_count: int, max_chars: int, metadata: Metadata) -> str:
        """Return the agent's compressed memory (last ``recent_count`` messages, each cut to ``max_chars``)."""
        request = memory_pb2.GetCompressedMemoryRequest(
            agent_name=agent, recent_count=recent_count, max_chars=max_chars
        )
        authorized = await self._authorized("GetCompressedMemory", metadata)
        response = await self.service.call("GetCompressedMemory", self._stub.GetCompressedMemory, request, authorized)
        return response.summary

    async def store(self, agent: str, turn_id: int, message: str, metadata: Metadata) -> int:
        """Store one turn, cut to ``max_store_chars`` (idempotent per agent and turn); returns the agent's count."""
        if len(message) > self._max_store_chars:
            message = message[: self._max_store_chars - 3] + "..."
        request = memory_pb2.StoreMemoryRequest(agent_name=agent, turn_id=turn_id, message=message)
        authorized = await self._authorized("StoreMemory", metadata)
        response = await self.service.call("StoreMemory", self._stub.StoreMemory, request, authorized)
        return response.agent_memory_count

    async def session_memories(self, metadata: Metadata) -> int:
        """How many memories the service holds for the calling session."""
        authorized = await self._authorized("GetStats", metadata)
        response = await self.service.call("GetStats", self._stub.GetStats, memory_pb2.GetStatsRequest(), authorized)
        return response.session_memories

    async def clear_session(self, metadata: Metadata) -> int:
        """Forget the calling session's memories; returns how many there were."""
        request = memory_pb2.ClearMemoriesRequest()
        authorized = await self._authorized("ClearMemories", metadata)
        response = await self.service.call("ClearMemories", self._stub.ClearMemories, request, authorized)
        return response.cleared


def session_metadata(session_id: str) -> Metadata:
    """Metadata every call of a session carries."""
    return ((SESSION_METADATA_KEY, session_id),)


def tool_metadata(session_id: str, token: str) -> Metadata:
    """Metadata of a tool call: the session plus the bearer token."""
    return ((SESSION_METADATA_KEY, session_id), (AUTHORIZATION_METADATA_KEY, f"Bearer {token}"))


class ServiceClients:
    """One reusable channel per configured service, plus the typed clients (a channel pool, not a mesh).

    Open it once and share it across sessions (benchmarks run many sessions on
    one mesh); ``close()`` closes the channels.
    """

    RECONNECT_BACKOFF_MS = (100, 1000)
    """Min/max reconnect backoff: a restarted service is noticed within a second, not gRPC's default 2 min."""

    def __init__(self, config: HeistConfig, registry: ToolRegistry | None = None, tracer: Tracer | None = None) -> None:
        self.config = config
        self.tracer = tracer
        """Where turns start their spans (None: tracing off; see ``orchestrator.tracing``)."""
        catalogue = Catalogue(config.services)
        self.registry = registry or ToolRegistry.for_services(config.tool_names)
        breaker_config = config.resilience.circuit_breaker
        self.services: dict[str, GuardedService] = {}
        for name, settings in config.services.items():
            full_name = catalogue[name].full_name
            # One address: gRPC's default pick_first, which redials a restarted server on the next call.
            # Several: round_robin over the replicas that report SERVING (see retry_service_config).
            balanced = full_name if settings.replicas > 1 else None
            service_config = retry_service_config([full_name], config.resilience.grpc_retry, health_service=balanced)
            options: list[tuple[str, Any]] = [
                ("grpc.enable_retries", 1),
                ("grpc.service_config", service_config),
                ("grpc.min_reconnect_backoff_ms", self.RECONNECT_BACKOFF_MS[0]),
                ("grpc.initial_reconnect_backoff_ms", self.RECONNECT_BACKOFF_MS[0]),
                ("grpc.max_reconnect_backoff_ms", self.RECONNECT_BACKOFF_MS[1]),
            ]
            target = channel_target(settings.replica_addresses)
            channel = tls.aio_channel(config, target, options, service=name)
            self.services[name] = GuardedService(name, target, settings.deadline_s, channel, breaker_config, full_name)
        self.tokens = TokenProvider(self.services["oauth"], config)
        self.memory = MemoryClient(
            self.services["memory"], self.tokens, config.session.oauth_client, config.session.memory.max_store_chars
        )
        self.tool_stubs: dict[str, Any] = {
            tool: service.stub_class(self.services[tool].channel)
            for tool, service in self.registry.services.items()
            if tool in self.services
        }

    async def check_health(self, timeout_s: float | None = None) -> list[HealthResult]:
        """grpc.health.v1 Check on every service, concurrently, each with its own short deadline."""
        deadline = timeout_s if timeout_s is not None else self.config.resilience.health_timeout_s
        return list(await asyncio.gather(*(self._check_one(service, deadline) for service in self.services.values())))

    @staticmethod
    async def _check_one(service: GuardedService, deadline: float) -> HealthResult:
        stub = health_pb2_grpc.HealthStub(service.channel)
        start = time.perf_counter()
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=deadline)
        except grpc.aio.AioRpcError as exc:
            detail = exc.details() or ""
            status = "UNREACHABLE" if exc.code() == grpc.StatusCode.UNAVAILABLE else exc.code().name
            return HealthResult(service.name, service.target, status, elapsed_ms(start), detail)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return HealthResult(service.name, service.target, status, elapsed_ms(start))

    async def close(self) -> None:
        """Close every channel (in-flight calls are cancelled)."""
        await asyncio.gather(*(service.channel.close(None) for service in self.services.values()))
