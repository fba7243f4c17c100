"""One agent's tool calls: each call the model asks for becomes exactly one ``tool_usage`` row.

Whatever happens to a call (not allowed, no token, bad arguments, the service
refusing or failing, the circuit open), the model gets a short text back and
the audit gets one row saying what happened, so a session's tool trail is
complete even when nothing worked.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

from heist_common.audit import ToolUsageRow
from heist_common.tools.argument_grammars import ConstraintCache, ListingFetcher
from heist_common.tools.registry import ToolArgumentError, ToolMethod, render_result
from orchestrator.mesh.clients import Metadata, ServiceCallError, ServiceClients, tool_metadata
from orchestrator.tools import markers
from orchestrator.tracing import elapsed_ms
from orchestrator.turn.constrained_tools import listing_changed
from orchestrator.turn.turn import Turn

__all__ = ["INVALID_ARGUMENT", "NOT_ALLOWED", "NO_TOKEN", "ToolCaller"]

NOT_ALLOWED = "NOT_ALLOWED"
NO_TOKEN = "NO_TOKEN"
INVALID_ARGUMENT = "INVALID_ARGUMENT"


class ToolCaller:
    """Calls tool RPCs for one agent of one session and records every call."""

    def __init__(
        self,
        clients: ServiceClients,
        session_id: str,
        agent_name: str,
        oauth_client: str,
        allowed: frozenset[str],
        result_max_chars: int,
        *,
        constraints: ConstraintCache | None = None,
        on_call: Callable[[Turn, str], None] | None = None,
    ) -> None:
        self._clients = clients
        self._on_call = on_call
        """Told ``tool.Method`` just before each RPC is sent (the turn's progress)."""
        self._constraints = constraints
        self._session_id = session_id
        self._agent = agent_name
        self._oauth_client = oauth_client
        self._allowed = allowed
        self._result_max_chars = result_max_chars
        self._metadata: tuple[str, Metadata] | None = None

    async def native(self, turn: Turn, function: str, arguments: str) -> str:
        """Call the method behind an OpenAI function name with the model's JSON arguments."""
        method = self._clients.registry.method_by_function(function)
        if method is None:
            reason = f"unknown tool function {function!r}"
            return refuse(turn, function, function, arguments, NOT_ALLOWED, reason)
        try:
            request = method.parse_arguments(arguments)
        except ToolArgumentError as exc:
            return refuse(turn, method.tool, method.method.name, arguments, INVALID_ARGUMENT, str(exc))
        return await self.call(turn, method, request)

    async def inline(self, turn: Turn, text: str) -> str:
        """Call every ``[TOOL:name:argument]`` marker in ``text`` (concurrently); replace each by its outcome."""
        found = markers.find(text)
        if not found:
            return text
        registry = self._clients.registry
        outcomes: dict[int, str] = {}
        pending: dict[int, Awaitable[str]] = {}
        for index, marker in enumerate(found):
            service = registry.services.get(marker.tool)
            method = service.inline_method if service is not None else None
            if method is None:
                reason = f"unknown tool {marker.tool!r}"
                outcomes[index] = refuse(turn, marker.tool, "inline", marker.argument, NOT_ALLOWED, reason)
            else:
                request = method.inline_request(marker.argument)
                pending[index] = self.call(turn, method, request, plain=True)
        outcomes.update(zip(pending, await asyncio.gather(*pending.values()), strict=True))
        for index, marker in enumerate(found):
            text = text.replace(marker.marker, markers.shown(marker.tool, marker.argument, outcomes[index]), 1)
        return text

    def listing_fetcher(self, token: str) -> ListingFetcher:
        """Fetch a tool's listing (``ListFiles``, ``ListTables``) with the agent's token, for the constraint cache.

        A step of the turn's timeline like any RPC, but no ``tool_usage`` row:
        the model did not ask for it.
        """

        async def fetch(tool: str, method: MethodDescriptor) -> Message:
            request = message_factory.GetMessageClass(method.input_type)()
            rpc = getattr(self._clients.tool_stubs[tool], method.name)
            response: Message = await self._clients.services[tool].call(
                method.name, rpc, request, self._metadata_for(token)
            )
            return response

        return fetch

    def _metadata_for(self, token: str) -> Metadata:
        cached = self._metadata
        if cached is None or cached[0] != token:
            cached = (token, tool_metadata(self._session_id, token))
            self._metadata = cached
        return cached[1]

    async def call(self, turn: Turn, method: ToolMethod, request: Message, *, plain: bool = False) -> str:
        """Call one tool RPC (if allowed and authorized) and record it in ``tool_usage``."""
        params = json.dumps(json_format.MessageToDict(request, preserving_proto_field_name=True), ensure_ascii=False)
        operation = method.method.name
        if method.tool not in self._allowed:
            reason = f"{self._agent} is not allowed to use {method.tool}"
            return refuse(turn, method.tool, operation, params, NOT_ALLOWED, reason)
        clients = self._clients
        service = clients.services[method.tool]
        token = turn.token
        if token is None:
            reason = f"{self._agent} has no OAuth token this turn"
            service.unsent(operation, NO_TOKEN)
            return refuse(turn, method.tool, operation, params, NO_TOKEN, reason)
        rpc = getattr(clients.tool_stubs[method.tool], operation)
        if self._on_call is not None:
            self._on_call(turn, f"{method.tool}.{operation}")
        start = time.perf_counter()
        try:
            response = await service.call(operation, rpc, request, self._metadata_for(token))
        except ServiceCallError as exc:
            if exc.status_code == "UNAUTHENTICATED":
                clients.tokens.invalidate(self._oauth_client)
            if self._constraints is not None and listing_changed(exc):
                self._constraints.invalidate(method.tool)  # the next constraint re-reads the listing
            reason = "circuit open" if exc.circuit_open else f"{exc.status_code}: {exc.detail}"
            latency = round(exc.latency_ms, 3)
            turn.tool_usage.append(
                ToolUsageRow(
                    turn.turn_id, self._agent, method.tool, operation, params, reason, False, exc.status_code, latency
                )
            )
            turn.events.append(exc.to_event(turn.turn_id, self._agent))
            return f"error: {reason}"
        text = render_result(response, self._result_max_chars, plain=plain)
        latency = round(elapsed_ms(start), 3)
        turn.tool_usage.append(
            ToolUsageRow(turn.turn_id, self._agent, method.tool, operation, params, text, True, "OK", latency)
        )
        return text


def refuse(turn: Turn, tool: str, operation: str, params: str, code: str, reason: str) -> str:
    """Record a tool call that was never sent (not allowed, bad arguments, no token); return what the model reads."""
    turn.refused(tool, operation, params, code, reason)
    return f"error: {reason}"
