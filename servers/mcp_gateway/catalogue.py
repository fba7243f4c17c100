"""MCP tools derived from the contracts: one per tool method, with the same schemas models get.

Nothing here names a tool. The name, description and argument schema are the orchestrator's function
schema (``heist_common.tools.registry``); where the contract hints at an argument's shape, the schema is
the live constraint ``heist_common.tools.argument_grammars`` builds from the service's own listing (an
``enum`` of real names, a ``pattern`` from the same grammar the embedded model is sampled under), so an
MCP client sees exactly what an agent is offered. A new tool service in the config is a new set of tools.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import mcp_types as types
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

from heist_common.tools.argument_grammars import ConstraintCache, ConstraintError, argument_hint
from heist_common.tools.registry import JsonSchema, ToolMethod, ToolRegistry

log = logging.getLogger("heist.mcp_gateway")

Fetch = Callable[[str, MethodDescriptor], Awaitable[Message]]


@dataclass(frozen=True)
class GatewayTool:
    """One MCP tool: the method behind it and the scope a token needs to call it."""

    method: ToolMethod

    @property
    def name(self) -> str:
        """``<service>_<method in snake case>``: the orchestrator's function name."""
        return self.method.function_name

    def callable_with(self, scopes: frozenset[str]) -> bool:
        """Whether a token carrying ``scopes`` may call it (the proto's ``required_scope``)."""
        return self.method.required_scope is None or self.method.required_scope in scopes


class Catalogue:
    """The tools of every configured tool service, with their live argument constraints."""

    def __init__(self, registry: ToolRegistry, *, max_age_s: float = 30.0) -> None:
        self.registry = registry
        self.tools = {
            method.function_name: GatewayTool(method)
            for service in registry.services.values()
            for method in service.methods
        }
        self._constraints = ConstraintCache(registry, max_age_s=max_age_s)

    def get(self, name: str) -> GatewayTool | None:
        """Return the tool called ``name`` (None: no such tool)."""
        return self.tools.get(name)

    async def input_schema(self, tool: GatewayTool, fetch: Fetch) -> JsonSchema:
        """Return the request's schema, its hinted argument constrained by the service's current listing.

        Falls back to the unconstrained schema when the contract has no hint or the listing names
        nothing now; a listing that cannot be fetched keeps the last constraint built.
        """
        method = tool.method
        try:
            hint = argument_hint(method.method)
        except ConstraintError as exc:
            log.warning("%s: argument constraint ignored: %s", tool.name, exc)
            return method.parameters
        if hint is None:
            return method.parameters
        constraint = await self._constraints.get(method.tool, method.method.name, fetch)
        return constraint.json_schema if constraint is not None else method.parameters

    async def mcp_tool(self, tool: GatewayTool, fetch: Fetch) -> types.Tool:
        """Build the ``tools/list`` entry of one tool."""
        return types.Tool(
            name=tool.name,
            description=tool.method.description,
            input_schema=await self.input_schema(tool, fetch),
            output_schema=tool.method.result_schema,
        )

    def invalidate(self, tool: GatewayTool) -> None:
        """Re-fetch the tool's listing on next use (the service said the argument names nothing it has)."""
        self._constraints.invalidate(tool.method.tool)
