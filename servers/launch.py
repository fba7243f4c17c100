"""Start any heist service inside the current event loop (tests, benchmarks, embedding).

Why a separate module: callers name a service instead of importing its module,
and get the same bootstrap (health, reflection, auth, access log) as the
``python -m servers.<name>`` processes.
"""

from __future__ import annotations

import importlib
from typing import Any

from servers.bootstrap import RunningServer, ServiceDefinition, start
from servers.settings import SERVICE_NAMES, MeshSettings

__all__ = ["SERVICE_NAMES", "RunningServer", "service_definition", "start_server"]


def service_definition(service_name: str, settings: MeshSettings) -> ServiceDefinition:
    """Build the servicer of ``service_name`` (one of SERVICE_NAMES) for ``settings``."""
    if service_name not in SERVICE_NAMES:
        raise ValueError(f"unknown service {service_name!r} (known: {', '.join(SERVICE_NAMES)})")
    module = importlib.import_module(f"servers.{service_name}")
    definition: ServiceDefinition = module.service_definition(settings)
    return definition


async def start_server(
    service_name: str, settings: MeshSettings, address: str = "127.0.0.1:0", *, log_stream: Any = None
) -> RunningServer:
    """Start one service in the running event loop; returns once it listens and reports SERVING.

    ``address`` defaults to an ephemeral port; ``RunningServer.address`` and
    ``RunningServer.port`` tell the real one. Stop it with ``await server.stop(grace)``.
    ``log_stream`` receives the access-log lines (default: stderr).
    """
    return await start(service_definition(service_name, settings), settings, address, log_stream=log_stream)
