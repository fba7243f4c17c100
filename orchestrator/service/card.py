"""The crew's A2A agent card: one skill per agent with its tools, the bearer-token scheme, the gRPC interface."""

from __future__ import annotations

from importlib import metadata

from a2a.types import a2a_pb2

from heist_common.config import ORCHESTRATOR_SERVICE, HeistConfig
from heist_common.contract import READ_SCOPE, RUN_SCOPE
from heist_common.tools.registry import ToolRegistry

SCHEME = "mesh_oauth"
"""The card's name for the mesh's bearer tokens."""
PROTOCOL_VERSION = "1.0"


def _version() -> str:
    try:
        return metadata.version("heist-mesh")
    except metadata.PackageNotFoundError:
        return "0"


def agent_card(config: HeistConfig, address: str | None = None) -> a2a_pb2.AgentCard:
    """Describe the crew as one A2A agent reachable over gRPC at ``address`` (default: the configured one)."""
    registry = ToolRegistry.for_services(config.tool_names)
    skills = []
    for agent in config.agents:
        tools = [method for tool in agent.tools for method in registry.service(tool).methods]
        described = "; ".join(f"{method.function_name}: {method.description}" for method in tools)
        description = f"{agent.role}. {agent.system_prompt.strip()}"
        if described:
            description += f" Tools: {described}"
        skills.append(
            a2a_pb2.AgentSkill(
                id=agent.name,
                name=f"{agent.name} ({agent.role})",
                description=description,
                tags=[agent.role, *agent.tools],
                input_modes=["text/plain"],
                output_modes=["text/plain", "application/json"],
            )
        )
    scheme = a2a_pb2.SecurityScheme(
        http_auth_security_scheme=a2a_pb2.HTTPAuthSecurityScheme(
            scheme="Bearer",
            bearer_format="JWT",
            description=(
                "A token from the mesh's heist.oauth.v1.OAuthService (client credentials): "
                f"{RUN_SCOPE} starts and cancels heists, {READ_SCOPE} reads, lists and follows the caller's own."
            ),
        )
    )
    requirement = a2a_pb2.SecurityRequirement()
    requirement.schemes[SCHEME].list.extend([RUN_SCOPE, READ_SCOPE])
    return a2a_pb2.AgentCard(
        name="heist-crew",
        description=(
            "A crew of LLM agents plans a simulated heist: send the objective as text (empty: the configured one), "
            "optionally a data part {turns, seed}; each completed turn streams as a status update."
        ),
        version=_version(),
        supported_interfaces=[
            a2a_pb2.AgentInterface(
                url=address or config.service(ORCHESTRATOR_SERVICE).address,
                protocol_binding="GRPC",
                protocol_version=PROTOCOL_VERSION,
            )
        ],
        capabilities=a2a_pb2.AgentCapabilities(streaming=True, push_notifications=False, extended_agent_card=True),
        security_schemes={SCHEME: scheme},
        security_requirements=[requirement],
        default_input_modes=["text/plain", "application/json"],
        default_output_modes=["text/plain", "application/json"],
        skills=skills,
    )
