"""The A2A SDK's own client, over its gRPC transport, against the orchestrator service; tokens from OAuthService."""

from __future__ import annotations

from typing import Any

import grpc
from a2a.client import ClientCallContext, ClientConfig, ClientFactory
from a2a.client.client import Client
from a2a.types import a2a_pb2
from google.protobuf import struct_pb2
from heist.oauth.v1 import oauth_pb2, oauth_pb2_grpc

from heist_common.config import HeistConfig
from servers.auth import credential_store
from tests.support import channels


def oauth_token(config: HeistConfig, client_id: str, scopes: list[str] | None = None) -> str:
    """A token from the mesh's OAuthService (client credentials), as any A2A caller gets one."""
    request = oauth_pb2.IssueTokenRequest(
        grant_type="client_credentials",
        client_id=client_id,
        client_secret=credential_store.client_secret(config, client_id),
        scopes=scopes or [],
    )
    with channels.channel(config, "oauth") as channel:
        response = oauth_pb2_grpc.OAuthServiceStub(channel).IssueToken(request, timeout=5)
    return str(response.access_token)


def bearer(token: str, timeout_s: float | None = 60) -> ClientCallContext:
    """The client call context that sends ``authorization: Bearer <token>``."""
    return ClientCallContext(service_parameters={"authorization": f"Bearer {token}"}, timeout=timeout_s)


def a2a_client(config: HeistConfig, address: str, *, streaming: bool = True) -> Client:
    """An a2a-sdk client for the orchestrator service at ``address`` (mTLS as the config says)."""
    card = a2a_pb2.AgentCard(
        name="heist-crew",
        supported_interfaces=[a2a_pb2.AgentInterface(url=address, protocol_binding="GRPC", protocol_version="1.0")],
        # extended_agent_card: GetExtendedAgentCard asks the service for the whole card
        capabilities=a2a_pb2.AgentCapabilities(streaming=True, extended_agent_card=True),
    )
    factory = ClientFactory(
        ClientConfig(
            streaming=streaming,
            grpc_channel_factory=lambda url: channels.aio_channel(config, "orchestrator", url),
            supported_protocol_bindings=["GRPC"],
        )
    )
    return factory.create(card)


def heist_request(
    objective: str = "", *, turns: int | None = None, seed: int | None = None, immediately: bool = False, **extra: Any
) -> a2a_pb2.SendMessageRequest:
    """A SendMessage starting a heist: text = objective, data part = turns/seed (``extra``: keys to refuse)."""
    parts = [a2a_pb2.Part(text=objective)]
    data = {key: value for key, value in {"turns": turns, "seed": seed, **extra}.items() if value is not None}
    if data:
        value = struct_pb2.Value()
        value.struct_value.update(data)
        parts.append(a2a_pb2.Part(data=value))
    message = a2a_pb2.Message(message_id="m1", role=a2a_pb2.ROLE_USER, parts=parts)
    return a2a_pb2.SendMessageRequest(
        message=message, configuration=a2a_pb2.SendMessageConfiguration(return_immediately=immediately)
    )


def status_code(error: BaseException) -> grpc.StatusCode | None:
    """The gRPC status behind an a2a-sdk client error (the SDK wraps the ``AioRpcError``)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, grpc.aio.AioRpcError):
            return cause.code()
        cause = cause.__cause__
    return None
