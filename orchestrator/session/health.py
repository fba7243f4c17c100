"""Can the mesh answer: every gRPC service and the LLM endpoint, probed at once.

Why its own module: ``orchestrator health`` needs only this, the clients and the
LLM client; importing it from ``runner`` would load the agent, prompts and audit
store too (about a tenth of a second of a command meant to answer at once).
"""

from __future__ import annotations

import asyncio

from orchestrator.llm.client import LLMClient
from orchestrator.mesh.clients import HealthResult, ServiceClients

__all__ = ["check_health"]


async def check_health(clients: ServiceClients, llm: LLMClient, timeout_s: float) -> list[HealthResult]:
    """Every gRPC service (``timeout_s`` each) and the LLM endpoint (its own ``health_timeout_s``), concurrently."""
    services, llm_health = await asyncio.gather(
        clients.check_health(timeout_s), llm.check_health(llm.config.health_timeout_s)
    )
    return [*services, llm_health]
