"""``python -m servers.orchestrator``: the orchestrator service (``orchestrator serve``), A2A over gRPC.

The one servers module that imports ``orchestrator``: the service hosts heists
(``orchestrator.service``) behind A2A's ``A2AService`` through the SDK's
handler, on the common bootstrap.

``servers.runtime.lifecycle`` gives it what every mesh service gets (mTLS,
grpc.health.v1, reflection, metrics, OpenTelemetry, bearer tokens checked per
method against ``heist_common.contract.A2A_SCOPES``, drain on SIGTERM). This
module adds the caller as the SDK's user (its tenant), and the checks the SDK
cannot make: the request's shape and the limits, before a heist is started.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterator
from typing import Any

import grpc
from a2a.auth.user import UnauthenticatedUser, User
from a2a.server.agent_execution import SimpleRequestContextBuilder
from a2a.server.id_generator import IDGenerator, IDGeneratorContext
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.request_handlers.grpc_handler import DefaultGrpcServerCallContextBuilder, GrpcHandler
from a2a.types import a2a_pb2
from prometheus_client import Metric
from prometheus_client.registry import Collector

from heist_common.audit import AuditError, CallNotPendingError, UnknownCallError, UnknownSessionError
from heist_common.audit.approvals import decide
from heist_common.config import ORCHESTRATOR_SERVICE, HeistConfig
from orchestrator.service.card import agent_card
from orchestrator.service.host import (
    RESERVATION,
    HeistExecutor,
    LimitError,
    RequestError,
    Reservation,
    SessionHost,
    parse_decision,
    parse_request,
)
from orchestrator.service.limits import ServiceLimits
from orchestrator.service.tasks import AuditTaskStore
from orchestrator.session.runner import new_session_id
from orchestrator.turn import approval
from servers.runtime import lifecycle
from servers.runtime.lifecycle import ServiceDefinition
from servers.runtime.middleware import CALLER

__all__ = ["ClientUser", "HeistGrpcHandler", "Limits", "service_definition"]

Limits = ServiceLimits
"""``services.orchestrator.limits`` (the lifecycle validates them with this model)."""


class ClientUser(User):
    """The OAuth client whose verified token the call carries: the owner of the tasks it starts."""

    def __init__(self, client_id: str) -> None:
        self._client_id = client_id

    @property
    def is_authenticated(self) -> bool:
        """Always: the middleware refused the call otherwise."""
        return True

    @property
    def user_name(self) -> str:
        """The OAuth client id."""
        return self._client_id


class CallerContextBuilder(DefaultGrpcServerCallContextBuilder):
    """Make the call's verified OAuth client the SDK's user (``servers.runtime.middleware.CALLER``)."""

    def build_user(self, context: grpc.aio.ServicerContext[Any, Any]) -> User:
        """Return the caller's client, or nobody (who owns no task) if no token was checked."""
        claims = CALLER.get()
        return ClientUser(claims.client_id) if claims is not None else UnauthenticatedUser()


class SessionIds(IDGenerator):
    """Task ids are session ids: ``heist_YYYYMMDD_HHMMSS_<16 hex>``."""

    def generate(self, context: IDGeneratorContext) -> str:
        """Return a new session id."""
        return new_session_id()


class HeistGrpcHandler(GrpcHandler):
    """The SDK's gRPC handler, with the request and the limits checked before a heist starts."""

    def __init__(self, request_handler: DefaultRequestHandler, host: SessionHost) -> None:
        super().__init__(request_handler, CallerContextBuilder())
        self.host = host

    async def _reserve(
        self, request: a2a_pb2.SendMessageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Reservation:
        claims = CALLER.get()
        if claims is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no verified token")
        assert claims is not None
        try:
            heist = parse_request(request.message, self.host.config, self.host.limits)
        except RequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            return self.host.reserve(claims.client_id, heist)
        except LimitError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        raise AssertionError("unreachable")

    async def _decide(self, request: a2a_pb2.SendMessageRequest, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Decide the waiting call a message on a task names, as its owner (any other client: NOT_FOUND)."""
        claims = CALLER.get()
        if claims is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no verified token")
        assert claims is not None
        session_id = request.message.task_id
        if not request.message.context_id:  # a heist's context is its session: the SDK would make up another
            request.message.context_id = session_id
        audit = self.host.audit
        try:
            owner = (await audit.run_in_writer(lambda: audit.read_session_log(session_id)))["session"].get("client_id")
        except UnknownSessionError:
            owner = None
        except AuditError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot read the audit: {exc}")
        if owner is None or owner != claims.client_id:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no task {session_id!r}")
        try:
            call_id = ""
            call_id, decision, reason = parse_decision(request.message)
            await decide(audit, session_id, call_id, decision, reason, claims.client_id)
        except UnknownCallError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"task {session_id!r} has no call {call_id!r}")
        except (RequestError, ValueError, CallNotPendingError) as exc:  # not pending: decided already, by whom
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except AuditError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot record the decision: {exc}")

    async def SendMessage(
        self, request: a2a_pb2.SendMessageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> a2a_pb2.SendMessageResponse:
        """Start a heist (checked and counted first), or decide a waiting call; then as the SDK does."""
        if request.message.task_id:
            await self._decide(request, context)
            return await super().SendMessage(request, context)
        reservation = await self._reserve(request, context)
        request.message.context_id = ""  # a heist's context is its session (the task id), whatever the caller chose
        token = RESERVATION.set(reservation)
        try:
            return await super().SendMessage(request, context)
        finally:
            RESERVATION.reset(token)
            self.host.release(reservation)

    async def SendStreamingMessage(
        self, request: a2a_pb2.SendMessageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterable[a2a_pb2.StreamResponse]:
        """Start a heist (checked and counted first), or decide a waiting call; stream it, as the SDK does."""
        if request.message.task_id:
            await self._decide(request, context)
            async for response in super().SendStreamingMessage(request, context):
                yield response
            return
        reservation = await self._reserve(request, context)
        request.message.context_id = ""  # a heist's context is its session (the task id), whatever the caller chose
        token = RESERVATION.set(reservation)
        try:
            async for response in super().SendStreamingMessage(request, context):
                yield response
        finally:
            RESERVATION.reset(token)
            self.host.release(reservation)


class HostedSessionSeries(Collector):
    """The LLM token counts of the heists this service hosts, on its own ``/metrics``.

    Why a collector that looks them up: the counter lives with the shared LLM
    client, which opens only when the server starts.
    """

    def __init__(self, host: SessionHost) -> None:
        self.host = host

    def describe(self) -> list[Metric]:
        """Nothing up front: the series exist once the host is open."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Yield the token counter's series (none before the host opens)."""
        try:
            resources = self.host.resources
        except RuntimeError:
            return
        yield from resources.llm.tokens.registry.collect()


def service_definition(config: HeistConfig, limits: ServiceLimits) -> ServiceDefinition:
    """Build the orchestrator service; its shared resources open when the server starts (``on_start``)."""
    host = SessionHost(config, limits)
    card = agent_card(config)
    request_handler = DefaultRequestHandler(
        agent_executor=HeistExecutor(host),
        task_store=AuditTaskStore(lambda: host.audit),
        agent_card=card,
        extended_agent_card=card,
        request_context_builder=SimpleRequestContextBuilder(task_id_generator=SessionIds()),
    )

    async def on_start() -> None:
        try:
            await host.open()
        except AuditError as exc:  # the lifecycle reports an OSError in one line, never a traceback
            raise OSError(str(exc)) from None

    async def on_stop() -> None:
        await request_handler.aclose()
        await host.close()

    # Approvals are counted in the process's default registry (orchestrator.turn.approval); served here too.
    collectors = (HostedSessionSeries(host), approval.PENDING, approval.DECIDED, approval.WAITED)
    return ServiceDefinition(
        ORCHESTRATOR_SERVICE, HeistGrpcHandler(request_handler, host), on_stop=on_stop, on_start=on_start,
        collectors=collectors,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(lifecycle.main(__spec__))
