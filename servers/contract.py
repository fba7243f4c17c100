"""What both sides of the mesh read from the contracts: metadata keys and scopes.

Kept in one place so the servers that enforce a policy and the orchestrator that
asks for tokens can never disagree; the scopes themselves live in the .proto
files as the ``heist.auth.v1.required_scope`` method option.
"""

from __future__ import annotations

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from heist.auth.v1 import options_pb2 as auth_options
from heist.tools.v1 import options_pb2 as tool_options

SESSION_METADATA_KEY = "x-session-id"
"""Call metadata that carries the heist session ID through every service."""

AUTHORIZATION_METADATA_KEY = "authorization"
"""Call metadata that carries ``Bearer <token>`` for tool services."""

TRACEPARENT_METADATA_KEY = "traceparent"
"""W3C Trace Context: ``00-<trace id>-<span id>-01``; one trace per agent turn."""


def required_scope(method: MethodDescriptor) -> str | None:
    """Return the OAuth scope a method requires, or None if it needs no token."""
    scope: str = method.GetOptions().Extensions[auth_options.required_scope]
    return scope or None


def tool_description(method: MethodDescriptor) -> str:
    """Return the model-facing description of a tool method ('' if none)."""
    description: str = method.GetOptions().Extensions[tool_options.tool_description]
    return description


def is_inline_default(method: MethodDescriptor) -> bool:
    """Whether the inline ``[TOOL:name:argument]`` convention calls this method."""
    flag: bool = method.GetOptions().Extensions[tool_options.inline_default]
    return flag


def scopes_by_method_path(service: ServiceDescriptor) -> dict[str, str | None]:
    """Map ``/package.Service/Method`` (gRPC's method path) to its required scope."""
    return {f"/{service.full_name}/{method.name}": required_scope(method) for method in service.methods}
