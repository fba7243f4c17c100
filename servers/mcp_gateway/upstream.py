"""The gateway's side of the mesh: its own token and client certificate, one channel per tool service.

Why as itself: the tool services authorize by token scope and identify callers by certificate; the
gateway presents its own (``mcp_gateway``), after checking the MCP client's token against the proto's
scopes, and names the client it calls for in ``x-on-behalf-of`` call metadata, beside the session.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from heist.oauth.v1 import oauth_pb2, oauth_pb2_grpc

from heist_common import tls
from heist_common.config import HeistConfig
from heist_common.contract import (
    AUTHORIZATION_METADATA_KEY,
    ON_BEHALF_OF_METADATA_KEY,
    SESSION_METADATA_KEY,
    TRACEPARENT_METADATA_KEY,
    contract_of,
)
from heist_common.credentials import client_secret

IDENTITY = "mcp_gateway"
"""The gateway's client certificate (``heist_common.tls.CLIENT_IDENTITIES``)."""
REFRESH_FRACTION = 0.8
"""A token is replaced once 80 % of its lifetime has passed, so it never expires mid-call."""


class UpstreamError(Exception):
    """The gateway could not get its own token; ``code`` is the gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Upstream:
    """Channels to the tool services and the OAuth service, and the gateway's token."""

    def __init__(self, config: HeistConfig, tools: Sequence[str], client_id: str) -> None:
        self._config = config
        self._client_id = client_id
        self._channels = {
            name: tls.aio_channel(config, config.service(name).address, service=name, identity=IDENTITY)
            for name in (*tools, "oauth")
        }
        self._stubs = {name: contract_of(name).stub_class(self._channels[name]) for name in tools}
        self._oauth = oauth_pb2_grpc.OAuthServiceStub(self._channels["oauth"])
        self._token: tuple[str, float, frozenset[str]] | None = None
        self._lock = asyncio.Lock()

    async def token(self) -> tuple[str, frozenset[str]]:
        """Return the gateway's bearer token and its scopes, issued by the OAuth service (client credentials)."""
        async with self._lock:
            if self._token is not None and time.monotonic() < self._token[1]:
                return self._token[0], self._token[2]
            request = oauth_pb2.IssueTokenRequest(
                grant_type="client_credentials",
                client_id=self._client_id,
                client_secret=client_secret(self._config, self._client_id),
            )
            try:
                response = await self._oauth.IssueToken(request, timeout=self._config.service("oauth").deadline_s)
            except grpc.aio.AioRpcError as exc:
                raise UpstreamError(exc.code().name, f"the gateway's own token: {exc.details()}") from None
            lifetime = max(float(response.expires_in), 0.0)
            scopes = frozenset(response.scopes)
            self._token = (response.access_token, time.monotonic() + lifetime * REFRESH_FRACTION, scopes)
            return response.access_token, scopes

    def forget_token(self) -> None:
        """Drop the cached token (after UNAUTHENTICATED: the signing key may have been rotated)."""
        self._token = None

    async def call(
        self,
        tool: str,
        method: MethodDescriptor,
        request: Message,
        *,
        caller: str,
        session: str,
        traceparent: str = "",
    ) -> Message:
        """Call ``tool``'s ``method`` as the gateway for ``caller``; grpc.aio.AioRpcError on a gRPC failure."""
        token, _ = await self.token()
        metadata: list[tuple[str, str]] = [(AUTHORIZATION_METADATA_KEY, f"Bearer {token}")]
        if caller:
            metadata.append((ON_BEHALF_OF_METADATA_KEY, caller))
        if session:
            metadata.append((SESSION_METADATA_KEY, session))
        if traceparent:
            metadata.append((TRACEPARENT_METADATA_KEY, traceparent))
        rpc = getattr(self._stubs[tool], method.name)
        response: Message = await rpc(request, metadata=metadata, timeout=self._config.service(tool).deadline_s)
        return response

    async def listing(self, tool: str, method: MethodDescriptor) -> Message:
        """Call a listing method (empty request) as the gateway itself: the live argument constraints."""
        request = message_factory.GetMessageClass(method.input_type)()
        return await self.call(tool, method, request, caller="", session="")

    async def close(self) -> None:
        """Close every channel."""
        await asyncio.gather(*(channel.close(None) for channel in self._channels.values()))
