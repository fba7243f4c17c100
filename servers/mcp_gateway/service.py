"""The gateway's HTTP server: MCP Streamable HTTP, bearer-token auth, audit, metrics and traces.

Built on the official ``mcp`` SDK's low-level ``Server`` (its ``tools/list`` and ``tools/call``
handlers) and its ``StreamableHTTPSessionManager``, behind the SDK's bearer-token middleware with the
mesh's own token verifier (``servers.auth.tokens``): a request without a valid token gets HTTP 401 with
``WWW-Authenticate: Bearer ... resource_metadata=...`` pointing at the protected-resource metadata
(RFC 9728), which names the mesh's OAuth service and the tool scopes.

Scopes: ``tools/list`` shows a token only the tools its scopes let it call, and ``tools/call`` of any
other tool is refused with a tool error naming the missing scope (so a client that guesses a name learns
no more than that it may not call it). Every call, refused or not, is a ``tool_usage`` row in the audit
database under the gateway session of the caller's OAuth client (``mcp-<client>``), with the agent name
being the client id, exactly as the orchestrator writes an agent's calls.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from types import FrameType
from typing import Any

import grpc
import mcp_types as types
import uvicorn
from google.protobuf.message import Message
from mcp.server.auth.middleware.auth_context import AuthContextMiddleware
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, BearerAuthBackend, RequireAuthMiddleware
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.routes import build_resource_metadata_url, create_protected_resource_routes
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from opentelemetry import propagate
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import AnyHttpUrl
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from heist_common import tls
from heist_common.audit import AuditError, AuditStore, SessionStatus, ToolUsageRow, TurnAudit
from heist_common.config import ConfigError, HeistConfig, McpGatewayConfig, ServerConfig, load_config
from heist_common.contract import SESSION_ID_PATTERN, SESSION_METADATA_KEY
from heist_common.credentials import CredentialsError
from heist_common.exit_codes import ExitCode
from heist_common.layout import use_private_umask
from heist_common.telemetry import Telemetry, setup_tracing
from heist_common.tools.registry import ToolArgumentError, ToolRegistry, render_result, response_data
from servers.auth import credential_store
from servers.auth.tokens import InvalidTokenError, TokenVerifier
from servers.mcp_gateway.bounds import ClientBounds
from servers.mcp_gateway.catalogue import Catalogue, GatewayTool
from servers.mcp_gateway.upstream import Upstream, UpstreamError
from servers.runtime.lifecycle import configure_logging, token_verifier
from servers.runtime.metrics import LATENCY_BUCKETS, MetricsEndpoint

log = logging.getLogger("heist.mcp_gateway")

NAME = "mcp_gateway"
READINESS_PATH = "/readyz"
MCP_SESSION_HEADER = "mcp-session-id"
AUDIT_STRATEGY = "mcp_gateway"
"""``sessions.strategy`` of a gateway session (its ``status`` is ``SessionStatus.GATEWAY``)."""
MAX_ARGUMENT_CHARS = 4000
"""The arguments kept in ``tool_usage.tool_params`` (the request itself is bounded by ``max_request_bytes``)."""
OUTCOMES = ("ok", "tool_error", "bad_arguments", "refused", "limited", "audit_failed")


def audit_session(client_id: str) -> str:
    """Return the audit session of one OAuth client's calls through the gateway: ``mcp-<client id>``."""
    return "mcp-" + re.sub(r"[^A-Za-z0-9_.-]", "_", client_id)[:120]


def base_url(settings: McpGatewayConfig, secure: bool) -> str:
    """``http(s)://host:port`` of the gateway."""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"{'https' if secure else 'http'}://{host}:{settings.port}"


class MeshTokenVerifier:
    """The SDK's ``TokenVerifier`` over the mesh's own: signature, issuer, audience and expiry, locally."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier

    async def verify_token(self, token: str) -> AccessToken | None:
        """Return the token's access info, or None (the SDK answers 401) if it does not verify."""
        try:
            claims = self._verifier.verify(token)
        except InvalidTokenError as exc:
            log.info("refused a token: %s", exc.reason)
            return None
        return AccessToken(
            token=token,
            client_id=claims.client_id,
            scopes=sorted(claims.scopes),
            expires_at=claims.expires_at,
            subject=claims.client_id,
            claims={"iss": claims.issuer, "aud": claims.audience, "sid": claims.session_id},
        )


class GatewayMetrics:
    """Prometheus series of the gateway: calls by tool and outcome, their latency, tools listed."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter(
            "heist_mcp_tool_calls",
            "MCP tools/call requests by tool and outcome.",
            ["tool", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "heist_mcp_tool_call_seconds",
            "Time from a tools/call request to its result, by tool.",
            ["tool"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.listed = Counter("heist_mcp_tool_lists", "MCP tools/list requests.", registry=self.registry)


class Gateway:
    """The tools/list and tools/call handlers, with what they need: catalogue, upstream, bounds, audit."""

    def __init__(self, config: HeistConfig, settings: McpGatewayConfig, telemetry: Telemetry) -> None:
        self.config = config
        self.settings = settings
        self.telemetry = telemetry
        registry = ToolRegistry.for_services(config.tool_names)
        self.catalogue = Catalogue(registry)
        self.upstream = Upstream(config, tuple(registry.services), settings.oauth_client)
        self.bounds = ClientBounds(
            rate=settings.calls_per_second,
            burst=settings.burst,
            max_in_flight=settings.max_concurrent_calls,
            max_in_flight_per_client=settings.max_concurrent_per_client,
        )
        self.metrics = GatewayMetrics()
        self.audit: AuditStore | None = None
        self._audited_sessions: set[str] = set()
        self.ready = False
        self.server: Server[Any] = Server(
            "heist-mcp-gateway",
            version="1",
            instructions="The heist mesh's tools; each call is audited under your OAuth client.",
            on_list_tools=self.list_tools,
            on_call_tool=self.call_tool,
        )

    # -- lifecycle ----------------------------------------------------------------------------

    def open(self) -> None:
        """Open the audit database (the one the orchestrator writes)."""
        self.audit = AuditStore.open(self.config.database.url)

    async def close(self) -> None:
        """Close the channels and the audit store."""
        self.ready = False
        await self.upstream.close()
        if self.audit is not None:
            self.audit.close()

    # -- handlers -----------------------------------------------------------------------------

    async def list_tools(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        """Every tool the caller's token may call, with its live input schema."""
        self.metrics.listed.inc()
        token = caller_token(ctx)
        scopes = frozenset(token.scopes) if token is not None else frozenset()
        relayed = await self._relayed_scopes()
        tools = [
            await self.catalogue.mcp_tool(tool, self.upstream.listing)
            for tool in self.catalogue.tools.values()
            if tool.callable_with(scopes) and tool.callable_with(relayed)
        ]
        return types.ListToolsResult(tools=tools)

    async def call_tool(
        self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        """Check scope and bounds, call the tool service as the gateway, audit, answer."""
        started = time.perf_counter()
        token = caller_token(ctx)
        client = token.client_id if token is not None else ""
        tool = self.catalogue.get(params.name)
        if tool is None or token is None:
            self.metrics.calls.labels("unknown", "refused").inc()
            return tool_error(f"unknown tool {params.name[:100]!r}")
        arguments = params.arguments or {}
        session = call_session(ctx, token)
        scope = tool.method.required_scope
        if not tool.callable_with(frozenset(token.scopes)):
            message = f"PERMISSION_DENIED: the token of {client!r} lacks the scope {scope!r} this tool requires"
            return await self._finish(tool, client, arguments, message, "PERMISSION_DENIED", started, "refused")
        if not tool.callable_with(await self._relayed_scopes()):
            message = f"UNAVAILABLE: the gateway's own OAuth client may not relay {scope!r} (oauth.clients)"
            return await self._finish(tool, client, arguments, message, "UNAVAILABLE", started, "refused")
        try:
            await self._open_audit_session(client)
        except AuditError as exc:
            log.error("audit: %s", exc)
            self.metrics.calls.labels(tool.name, "audit_failed").inc()
            return tool_error("UNAVAILABLE: the audit database cannot record this call; nothing was called")
        refused = self.bounds.acquire(client)
        if refused is not None:
            return await self._finish(tool, client, arguments, f"RESOURCE_EXHAUSTED: {refused}",
                                      "RESOURCE_EXHAUSTED", started, "limited")  # fmt: skip
        try:
            return await self._relay(tool, client, session, arguments, started)
        finally:
            self.bounds.release(client)

    async def _relay(
        self, tool: GatewayTool, client: str, session: str, arguments: dict[str, Any], started: float
    ) -> types.CallToolResult:
        try:
            request = tool.method.parse_arguments(arguments)
        except ToolArgumentError as exc:
            return await self._finish(tool, client, arguments, f"INVALID_ARGUMENT: {exc}", "INVALID_ARGUMENT",
                                      started, "bad_arguments")  # fmt: skip
        carrier: dict[str, str] = {}
        span: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        if self.telemetry.tracer is not None:
            span = self.telemetry.tracer.start_as_current_span(
                f"mcp tools/call {tool.name}",
                attributes={"heist.tool": tool.method.tool, "heist.client": client, "heist.session_id": session},
            )
        with span:
            propagate.inject(carrier)
            try:
                response = await self.upstream.call(
                    tool.method.tool, tool.method.method, request,
                    caller=client, session=session, traceparent=carrier.get("traceparent", ""),
                )  # fmt: skip
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    self.upstream.forget_token()
                if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                    self.catalogue.invalidate(tool)  # the listing may have changed under the constraint
                message = f"{code.name}: {exc.details() or 'no details'}"
                return await self._finish(tool, client, arguments, message, code.name, started, "tool_error")
            except UpstreamError as exc:
                return await self._finish(tool, client, arguments, f"{exc.code}: {exc.message}", exc.code,
                                          started, "tool_error")  # fmt: skip
        return await self._finish(tool, client, arguments, response, "OK", started, "ok")

    async def _finish(
        self,
        tool: GatewayTool,
        client: str,
        arguments: dict[str, Any],
        outcome: Message | str,
        status_code: str,
        started: float,
        label: str,
    ) -> types.CallToolResult:
        """Audit the call, count it, and build its MCP result (a tool error unless ``outcome`` is a response)."""
        latency_ms = (time.perf_counter() - started) * 1000.0
        max_chars = self.config.session.tool_result_max_chars
        success = isinstance(outcome, Message)
        text = render_result(outcome, max_chars) if isinstance(outcome, Message) else outcome[:max_chars]
        row = ToolUsageRow(
            turn_id=0,
            agent_name=client,
            tool_name=tool.method.tool,
            operation=tool.method.method.name,
            tool_params=json.dumps(arguments, ensure_ascii=False, sort_keys=True)[:MAX_ARGUMENT_CHARS],
            tool_result=render_result(outcome, max_chars, plain=True) if isinstance(outcome, Message) else text,
            success=success,
            status_code=status_code,
            latency_ms=round(latency_ms, 3),
        )
        self.metrics.calls.labels(tool.name, label).inc()
        self.metrics.latency.labels(tool.name).observe(latency_ms / 1000.0)
        if client:
            try:
                await self._open_audit_session(client)
                assert self.audit is not None
                await self.audit.write_turn(audit_session(client), TurnAudit(tool_usage=[row]))
            except AuditError as exc:
                log.error("audit: %s", exc)
                self.metrics.calls.labels(tool.name, "audit_failed").inc()
        if isinstance(outcome, Message):
            return types.CallToolResult(
                content=[types.TextContent(type="text", text=text)], structured_content=response_data(outcome)
            )
        return tool_error(text)

    async def _open_audit_session(self, client: str) -> None:
        session_id = audit_session(client)
        if session_id in self._audited_sessions:
            return
        if self.audit is None:
            raise AuditError("the audit database is not open")
        await self.audit.ensure_session(session_id, status=SessionStatus.GATEWAY, strategy=AUDIT_STRATEGY, model="-")
        self._audited_sessions.add(session_id)

    async def _relayed_scopes(self) -> frozenset[str]:
        """Scopes the gateway's own token carries (none while the OAuth service cannot be reached)."""
        try:
            _, scopes = await self.upstream.token()
        except (UpstreamError, CredentialsError) as exc:
            log.warning("no token of its own: %s", exc)
            return frozenset()
        return scopes


def tool_error(message: str) -> types.CallToolResult:
    """Build an MCP tool error: ``isError`` with the message as text."""
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)], is_error=True)


def caller_token(ctx: ServerRequestContext[Any]) -> AccessToken | None:
    """Return the verified token of the HTTP request behind this MCP request (None outside HTTP)."""
    request = ctx.request
    user = request.scope.get("user") if isinstance(request, Request) else None
    return user.access_token if isinstance(user, AuthenticatedUser) else None


def call_session(ctx: ServerRequestContext[Any], token: AccessToken) -> str:
    """Return the session tool services see: the token's, else ``x-session-id``, else the MCP session (or '')."""
    bound = (token.claims or {}).get("sid")
    if isinstance(bound, str) and bound:
        return bound
    request = ctx.request
    if not isinstance(request, Request):
        return ""
    for header in (SESSION_METADATA_KEY, MCP_SESSION_HEADER):
        value = request.headers.get(header, "")
        if SESSION_ID_PATTERN.match(value):
            return value
    return ""


def build_app(gateway: Gateway, verifier: TokenVerifier, secure: bool) -> Starlette:
    """Build the Starlette app: the MCP endpoint behind bearer auth, the resource metadata, readiness."""
    settings = gateway.settings
    url = base_url(settings, secure)
    resource = AnyHttpUrl(url + settings.path)
    security = None
    if settings.host in ("127.0.0.1", "localhost", "::1"):  # the SDK's DNS-rebinding protection, as it sets it
        security = TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*"],
            allowed_origins=[f"{scheme}://{host}:*" for scheme in ("http", "https")
                             for host in ("127.0.0.1", "localhost", "[::1]")],
        )  # fmt: skip
    manager = StreamableHTTPSessionManager(
        app=gateway.server,
        json_response=True,  # a tools/call answers with one JSON body: no SSE stream per request
        security_settings=security,
        max_request_body_size=settings.max_request_bytes,
        session_idle_timeout=settings.session_idle_s,
        max_sessions=settings.max_sessions,
    )
    oauth = gateway.config.service("oauth")
    scopes = sorted({scope for tool in gateway.catalogue.tools.values() if (scope := tool.method.required_scope)})
    metadata_routes = create_protected_resource_routes(
        resource_url=resource,
        authorization_servers=[AnyHttpUrl(f"{'https' if secure else 'http'}://{oauth.address}")],
        scopes_supported=scopes,
        resource_name="heist mesh MCP gateway",
    )
    bare = Route("/.well-known/oauth-protected-resource", metadata_routes[0].endpoint, methods=["GET", "OPTIONS"])

    async def ready(request: Request) -> Response:
        status = "SERVING" if gateway.ready else "NOT_SERVING"
        return JSONResponse({"status": status}, status_code=200 if gateway.ready else 503)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with manager.run():
            gateway.ready = True
            try:
                yield
            finally:
                gateway.ready = False

    endpoint = RequireAuthMiddleware(StreamableHTTPASGIApp(manager), [], build_resource_metadata_url(resource))
    return Starlette(
        routes=[Route(settings.path, endpoint), *metadata_routes, bare, Route(READINESS_PATH, ready)],
        middleware=[
            Middleware(AuthenticationMiddleware, backend=BearerAuthBackend(MeshTokenVerifier(verifier))),
            Middleware(AuthContextMiddleware),
        ],
        lifespan=lifespan,
    )


async def serve(config: HeistConfig, settings: McpGatewayConfig, grace_s: float) -> None:
    """Serve until SIGTERM/SIGINT (uvicorn's own handlers), then let calls in flight finish within ``grace_s``."""
    secure = tls.mtls(config)
    if secure:
        credential_store.ensure_dev_tls(config)
    verifier = token_verifier(config)
    telemetry = setup_tracing(f"heist-{NAME}")
    gateway = Gateway(config, settings, telemetry)
    gateway.open()
    app = build_app(gateway, verifier, secure)
    _, certificate, key = tls.identity_files(config, tls.GATEWAY_HTTPS_IDENTITY)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            ssl_certfile=str(certificate) if secure else None,
            ssl_keyfile=str(key) if secure else None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=max(1, round(grace_s)),
            limit_concurrency=settings.max_sessions + settings.max_concurrent_calls + 16,
        )
    )
    metrics = None
    if settings.metrics_address:
        bounds = ServerConfig()
        metrics = await MetricsEndpoint.start(
            gateway.metrics.registry,
            settings.metrics_address,
            max_connections=bounds.metrics_max_connections,
            timeout_s=bounds.metrics_timeout_s,
        )
        log.info("%s metrics on %s", NAME, metrics.url)
    log.info("%s: MCP at %s%s (%s)", NAME, base_url(settings, secure), settings.path, config.security.transport)
    # uvicorn re-raises the signal it stopped on once it has drained, to the handler installed before it:
    # the default one would kill the process before the audit store closes and exit 143 (Kubernetes: failed).
    previous = {sig: signal.signal(sig, _already_stopping) for sig in STOP_SIGNALS}
    try:
        await server.serve()
    finally:
        await gateway.close()
        if metrics is not None:
            await metrics.stop()
        telemetry.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise OSError(f"{NAME}: cannot listen on {settings.address} (port in use?)")
    log.info("%s: stopped", NAME)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _already_stopping(signum: int, frame: FrameType | None) -> None:
    """Take the signal uvicorn re-raises after its graceful shutdown: the gateway is stopping already."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m servers.mcp_gateway --config PATH``."""
    parser = argparse.ArgumentParser(prog=f"python -m servers.{NAME}", description="Run the MCP gateway.")
    parser.add_argument("--config", default="config/heist.yaml", help="mesh config file (default: %(default)s)")
    args = parser.parse_args(argv)
    use_private_umask()
    configure_logging()
    try:
        config = load_config(args.config)
        config.mesh.make_private()
    except ConfigError as exc:
        log.error("%s", exc)
        return ExitCode.CONFIG
    if config.mcp_gateway is None:
        log.error("%s: the config has no mcp_gateway section", NAME)
        return ExitCode.CONFIG
    try:
        asyncio.run(serve(config, config.mcp_gateway, config.mesh.shutdown_grace_s))
    except (OSError, CredentialsError, AuditError) as exc:
        log.error("%s: %s", NAME, exc)
        return ExitCode.FAILED
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
