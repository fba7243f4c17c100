"""``python -m servers.orchestrator``: the orchestrator service (``orchestrator serve``) by the servers' convention.

The service itself lives in ``orchestrator.service``; this module is what the
lifecycle and the supervisor find for ``services.orchestrator``.
"""

from __future__ import annotations

from heist_common.config import HeistConfig
from orchestrator.service.limits import ServiceLimits
from orchestrator.service.server import service_definition as _service_definition
from servers.runtime import lifecycle
from servers.runtime.lifecycle import ServiceDefinition

Limits = ServiceLimits


def service_definition(config: HeistConfig, limits: ServiceLimits) -> ServiceDefinition:
    """Build the orchestrator service."""
    return _service_definition(config, limits)


if __name__ == "__main__":
    raise SystemExit(lifecycle.main(__spec__))
