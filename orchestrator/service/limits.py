"""The orchestrator service's limits (``services.orchestrator.limits``): what one caller may ask of it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ServiceLimits(BaseModel):
    """Bounds on what callers of ``orchestrator serve`` may start (beyond: RESOURCE_EXHAUSTED, INVALID_ARGUMENT)."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # as every service's limits (servers.runtime.lifecycle)

    max_sessions: int = Field(
        default=256, ge=1, le=100_000, description="Heists running at once in the service, all clients together."
    )
    max_sessions_per_client: int = Field(
        default=256, ge=1, le=100_000, description="Heists one OAuth client may have running at once."
    )
    max_turns: int = Field(
        default=64, ge=1, le=10_000, description="The most turns a caller may ask for in one heist (data part `turns`)."
    )
    max_objective_chars: int = Field(
        default=4000, ge=1, le=1_000_000, description="The longest objective (the message's text) a caller may send."
    )
    export: bool = Field(
        default=True,
        description="Write each finished heist's JSON/Markdown logs and HTML report, as `orchestrator run` does.",
    )
