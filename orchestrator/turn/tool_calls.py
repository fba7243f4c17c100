"""One agent's tool calls: each call the model asks for becomes exactly one ``tool_usage`` row.

Whatever happens to a call (not allowed, no token, bad arguments, the service
refusing or failing, the circuit open, a person denying it), the model gets a
short text back and the audit gets one row saying what happened, so a session's
tool trail is complete even when nothing worked.

Exactly once: a call that gets past those checks is first written to the
audit's ``tool_calls`` (id ``<turn>.<index>``, status ``pending_approval`` or
``started``), then sent with that id as ``x-call-id`` metadata; its row in
``tool_usage`` commits with the turn. A resume finds the calls of the turn a
dead process left (``settle``): it sends an approved one, records a denied
one, waits for an undecided one, and never sends a ``started`` one again
(``RESULT_UNKNOWN``) unless its contract declares it idempotent.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

from heist_common.audit import DENIED, RESULT_UNKNOWN, AuditStore, CallStatus, EventRow, ToolUsageRow, now_iso
from heist_common.contract import CALL_ID_METADATA_KEY
from heist_common.tools.argument_grammars import ConstraintCache, ListingFetcher
from heist_common.tools.registry import ToolArgumentError, ToolMethod, render_result
from orchestrator.mesh.clients import Metadata, ServiceCallError, ServiceClients, tool_metadata
from orchestrator.tools import markers
from orchestrator.tracing import elapsed_ms
from orchestrator.turn.approval import ApprovalGate
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
        audit: AuditStore | None = None,
        gate: ApprovalGate | None = None,
        require_approval: frozenset[str] = frozenset(),
    ) -> None:
        """``audit``: where calls are recorded before they are sent (None: not recorded, no approvals either)."""
        self._audit = audit
        self._clients = clients
        self._on_call = on_call
        """Told ``tool.Method`` just before each RPC is sent (the turn's progress)."""
        self._gate = gate
        self._require_approval = require_approval
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
        call_id = turn.next_call_id()
        needs_approval = (
            self._gate is not None
            and self._audit is not None
            and (method.approval_required or method.tool in self._require_approval)
        )
        status = CallStatus.PENDING_APPROVAL if needs_approval else CallStatus.STARTED
        record = self._record(turn, call_id, method, params, status)
        if self._audit is not None:  # before the RPC: a resume knows it may have run
            await self._audit.open_tool_call(self._session_id, record)
        if needs_approval:
            assert self._gate is not None and self._audit is not None
            decided = await self._gate.wait({"session_id": self._session_id, **record})
            if decided["status"] != CallStatus.APPROVED or not await self._audit.start_tool_call(
                self._session_id, call_id
            ):
                return self._denied(turn, method, params, call_id, decided)
        return await self._send(turn, method, request, params, call_id, token, plain=plain)

    def _record(self, turn: Turn, call_id: str, method: ToolMethod, params: str, status: str) -> dict[str, object]:
        return {
            "call_id": call_id,
            "turn_id": turn.turn_id,
            "call_index": int(call_id.rsplit(".", 1)[1]),
            "agent_name": self._agent,
            "tool_name": method.tool,
            "operation": method.method.name,
            "tool_params": params,
            "status": status,
            "created_at": now_iso(),
            "started_at": now_iso() if status == CallStatus.STARTED else None,
        }

    async def _send(
        self, turn: Turn, method: ToolMethod, request: Message, params: str, call_id: str, token: str, *, plain: bool
    ) -> str:
        """Send a recorded call (its id as ``x-call-id``) and append its ``tool_usage`` row."""
        clients = self._clients
        operation = method.method.name
        service = clients.services[method.tool]
        rpc = getattr(clients.tool_stubs[method.tool], operation)
        metadata = (*self._metadata_for(token), (CALL_ID_METADATA_KEY, call_id))
        if self._on_call is not None:
            self._on_call(turn, f"{method.tool}.{operation}")
        start = time.perf_counter()
        try:
            response = await service.call(operation, rpc, request, metadata)
        except ServiceCallError as exc:
            if exc.status_code == "UNAUTHENTICATED":
                clients.tokens.invalidate(self._oauth_client)
            if self._constraints is not None and listing_changed(exc):
                self._constraints.invalidate(method.tool)  # the next constraint re-reads the listing
            reason = "circuit open" if exc.circuit_open else f"{exc.status_code}: {exc.detail}"
            latency = round(exc.latency_ms, 3)
            turn.tool_usage.append(
                ToolUsageRow(
                    turn.turn_id, self._agent, method.tool, operation, params, reason, False, exc.status_code, latency,
                    call_id=call_id,
                )
            )  # fmt: skip
            turn.events.append(exc.to_event(turn.turn_id, self._agent))
            return f"error: {reason}"
        text = render_result(response, self._result_max_chars, plain=plain)
        latency = round(elapsed_ms(start), 3)
        turn.tool_usage.append(
            ToolUsageRow(turn.turn_id, self._agent, method.tool, operation, params, text, True, "OK", latency,
                         call_id=call_id)
        )  # fmt: skip
        return text

    def _denied(self, turn: Turn, method: ToolMethod, params: str, call_id: str, record: dict[str, object]) -> str:
        """Record a call a person (or the timeout) denied: a failed row with the reason; return what the model reads."""
        by = record.get("decided_by") or "nobody"
        reason = f"denied by {by}" + (f": {record['reason']}" if record.get("reason") else "")
        operation = method.method.name
        turn.tool_usage.append(
            ToolUsageRow(turn.turn_id, self._agent, method.tool, operation, params, reason, False, DENIED, 0.0,
                         call_id=call_id)
        )  # fmt: skip
        turn.events.append(EventRow(method.tool, operation, DENIED, reason, 0.0, turn.turn_id, self._agent))
        return f"error: the call was {reason}"

    async def settle(self, turn: Turn, leftovers: list[dict[str, object]]) -> list[str]:
        """Finish the calls a dead process left in this turn (resume); return notes telling the model how they ended.

        Never sends a ``started`` call again unless its method is idempotent; an
        undecided one waits for its decision (the same record: nobody is asked
        for a second call), an approved one is sent now, a denied one recorded.
        """
        registry = self._clients.registry
        notes: list[str] = []
        for record in leftovers:
            call_id, tool, operation = str(record["call_id"]), str(record["tool_name"]), str(record["operation"])
            params, status = str(record["tool_params"]), str(record["status"])
            turn.skip_call_ids(int(str(record["call_index"])))
            service = registry.services.get(tool)
            method = next((m for m in service.methods if m.method.name == operation), None) if service else None
            shown = f"{tool}.{operation} {params}"
            if status == CallStatus.PENDING_APPROVAL and self._gate is not None and method is not None:
                record = await self._gate.wait(record)
                status = str(record["status"])
            if method is None:
                self._unknown(turn, tool, operation, params, call_id, "its tool is no longer configured")
                notes.append(f"Before the interruption you called {shown}; it cannot be finished now.")
            elif status == CallStatus.APPROVED and (token := await self._may_send(turn, call_id)) is not None:
                result = await self._send(turn, method, method.parse_arguments(params), params, call_id, token,
                                          plain=True)  # fmt: skip
                notes.append(f"Your call {shown} was approved and returned: {result}")
            elif status == CallStatus.APPROVED:  # approved, but this turn has no token to send it with
                reason = f"{self._agent} has no OAuth token this turn"
                turn.tool_usage.append(
                    ToolUsageRow(turn.turn_id, self._agent, tool, operation, params, reason, False, NO_TOKEN, 0.0,
                                 call_id=call_id)
                )  # fmt: skip
                notes.append(f"Your call {shown} was approved but could not be sent: {reason}.")
            elif status in (CallStatus.DENIED, CallStatus.PENDING_APPROVAL):
                text = self._denied(turn, method, params, call_id, record)
                notes.append(f"Your call {shown} was not run: {text.removeprefix('error: ')}")
            elif status == CallStatus.STARTED:
                self._unknown(turn, tool, operation, params, call_id, "the process making it died before its result "
                              "was recorded; it may have run")  # fmt: skip
                if method.idempotent and turn.token is not None:
                    result = await self.call(turn, method, method.parse_arguments(params), plain=True)
                    notes.append(f"Your call {shown} was interrupted; sent again (it is safe to repeat): {result}")
                else:
                    notes.append(f"Your call {shown} was interrupted: it may or may not have run, and its result is "
                                 "unknown; it was not sent again.")  # fmt: skip
        return notes

    async def _may_send(self, turn: Turn, call_id: str) -> str | None:
        """Mark an approved leftover call ``started`` if it can be sent now; return the token to send it with."""
        if turn.token is None or self._audit is None:
            return None
        return turn.token if await self._audit.start_tool_call(self._session_id, call_id) else None

    def _unknown(self, turn: Turn, tool: str, operation: str, params: str, call_id: str, reason: str) -> None:
        turn.tool_usage.append(
            ToolUsageRow(turn.turn_id, self._agent, tool, operation, params, f"result unknown: {reason}", False,
                         RESULT_UNKNOWN, None, call_id=call_id)
        )  # fmt: skip
        turn.events.append(EventRow(tool, operation, RESULT_UNKNOWN, reason, None, turn.turn_id, self._agent))


def refuse(turn: Turn, tool: str, operation: str, params: str, code: str, reason: str) -> str:
    """Record a tool call that was never sent (not allowed, bad arguments, no token); return what the model reads."""
    turn.refused(tool, operation, params, code, reason)
    return f"error: {reason}"
