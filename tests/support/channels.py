"""The one way tests open a gRPC channel: with the transport the config says (mTLS by default).

Tests never call ``grpc.insecure_channel`` directly, so every suite runs over
the same mutual TLS as ``make serve``; a plaintext config gets plaintext.
"""

from __future__ import annotations

from typing import Any

import grpc

from heist_common import tls
from heist_common.config import HeistConfig


def channel(
    config: HeistConfig, service: str, address: str | None = None, *, identity: str = "orchestrator", **options: Any
) -> grpc.Channel:
    """A blocking channel to ``service`` (at ``address``, default its configured one; ``options``: gRPC channel
    arguments, dots as given). Under mTLS the server must present ``service``'s own certificate."""
    target = address or config.service(service).address
    return tls.sync_channel(config, target, list(options.items()), service=service, identity=identity)


def aio_channel(
    config: HeistConfig, service: str, address: str | None = None, *, identity: str = "orchestrator", **options: Any
) -> grpc.aio.Channel:
    """An asyncio channel to ``service`` (see ``channel``)."""
    target = address or config.service(service).address
    return tls.aio_channel(config, target, list(options.items()), service=service, identity=identity)
