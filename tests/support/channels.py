"""The one way tests open a gRPC channel: with the transport the config says (mTLS by default).

Tests never call ``grpc.insecure_channel`` directly, so every suite runs over
the same mutual TLS as ``make serve``; a plaintext config gets plaintext.
"""

from __future__ import annotations

from typing import Any

import grpc

from heist_common import tls
from heist_common.config import HeistConfig


def channel(config: HeistConfig, address: str, *, identity: str = "orchestrator", **options: Any) -> grpc.Channel:
    """A blocking channel to ``address`` (``options``: gRPC channel arguments, dots as given)."""
    return tls.sync_channel(config, address, list(options.items()), identity=identity)


def aio_channel(
    config: HeistConfig, address: str, *, identity: str = "orchestrator", **options: Any
) -> grpc.aio.Channel:
    """An asyncio channel to ``address`` (see ``channel``)."""
    return tls.aio_channel(config, address, list(options.items()), identity=identity)
