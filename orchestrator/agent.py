"""One agent's turn over every service, where no single failure can end the session.

A turn: compressed memory (usually prefetched) -> OAuth token (cached) -> LLM,
with tool calls over gRPC -> audit write (SQLite, the source of truth)
concurrently with StoreMemory. Each step's failure is caught, becomes an
``events`` row, and the turn carries on in a degraded way: no memory, no tools,
or the error text as the message. Only an unwritable audit database stops the
run, because then nothing could be trusted afterwards.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import json
import re
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from orchestrator.audit import AuditStore, EventRow, MessageRow, ToolUsageRow, TurnAudit
from orchestrator.clients import Metadata, ServiceCallError, ServiceMesh, session_metadata, tool_metadata
from orchestrator.config import AgentConfig, HeistConfig
from orchestrator.llm import Completion, LLMClient, LLMError, find_inline_tool_calls
from orchestrator.tools import ToolArgumentError, ToolMethod, render_result
from orchestrator.tracing import start_trace

__all__ = ["ConversationMessage", "IntegratedAgent", "MemorySync", "SessionContext", "TurnResult"]

PARROT_SIMILARITY = 0.8
"""A transcript reply this similar to an earlier line is resampled."""
PARROT_RESAMPLE_BOOSTS = (0.3, 0.6)
NO_REPLY = "(says nothing)"
"""A transcript turn whose every sample was empty: recorded as such rather than as an empty message."""
"""Temperature added for each resample of a parroted reply (at most this many resamples)."""
NOT_ALLOWED = "NOT_ALLOWED"
NO_TOKEN = "NO_TOKEN"
INVALID_ARGUMENT = "INVALID_ARGUMENT"
SABOTEUR_BRIEF = (
    " Secretly you are a mole working for the police: subtly steer the crew towards mistakes without ever revealing it."
)


@dataclass(frozen=True, slots=True)
class ConversationMessage:
    """One line of the shared conversation."""

    turn_id: int
    agent_name: str
    agent_role: str
    message: str


@dataclass(slots=True)
class TurnResult:
    """What a turn produced and what it cost (the runner prints it, benchmarks time it)."""

    turn_id: int
    agent_name: str
    agent_role: str
    message: str
    status: str
    tool_usage: list[ToolUsageRow] = field(default_factory=list)
    events: list[EventRow] = field(default_factory=list)
    llm_ms: float = 0.0
    total_ms: float = 0.0
    trace_id: str = ""

    @property
    def service_ms(self) -> float:
        """Time spent outside the LLM: memory, OAuth, tools, audit and StoreMemory."""
        return self.total_ms - self.llm_ms


@dataclass(slots=True)
class MemoryFetch:
    """A compressed-memory lookup's outcome; never raises, so it can be prefetched as a task."""

    summary: str = ""
    error: ServiceCallError | None = None


class MemorySync:
    """Keeps the memory service consistent with the audit, its source of truth.

    The memory service is a cache: when it was down (a call failed) or silently
    lost data (a restart: it reports fewer memories than were written), the
    session's messages are re-stored from the audit database. StoreMemory is
    idempotent per (agent, turn), so re-storing never duplicates.
    """

    def __init__(self, mesh: ServiceMesh, audit: AuditStore, session_id: str, metadata: Metadata) -> None:
        self._mesh = mesh
        self._audit = audit
        self._session_id = session_id
        self._metadata = metadata
        self.degraded = False
        self.messages_written = 0
        self.per_agent: dict[str, int] = {}
        self.rebuilds = 0

    def record_written(self, agent_name: str) -> None:
        """Count a message that reached the audit database."""
        self.messages_written += 1
        self.per_agent[agent_name] = self.per_agent.get(agent_name, 0) + 1

    async def after_store(self, agent_name: str, agent_memory_count: int, turn_id: int) -> list[EventRow]:
        """Rebuild after a successful StoreMemory if the service lost anything."""
        lost = agent_memory_count < self.per_agent.get(agent_name, 0)
        if not (lost or self.degraded):
            return []
        try:
            held = await self._mesh.memory.session_memories(self._metadata)
        except ServiceCallError as exc:
            self.degraded = True
            return [exc.to_event(turn_id, agent_name)]
        if held >= self.messages_written and not lost:
            self.degraded = False
            return []
        return await self.rebuild(turn_id)

    async def rebuild(self, turn_id: int | None = None) -> list[EventRow]:
        """Re-store every message of the session from the audit database."""
        start = time.perf_counter()
        rows = await self._audit.agent_messages(self._session_id)
        memory = self._mesh.memory
        outcomes = await asyncio.gather(
            *(memory.store(agent, turn, text, self._metadata) for agent, turn, text in rows), return_exceptions=True
        )
        failures = [o for o in outcomes if isinstance(o, ServiceCallError)]
        unexpected = [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, ServiceCallError)]
        if unexpected:
            raise unexpected[0]
        latency = (time.perf_counter() - start) * 1000.0
        if failures:
            self.degraded = True
            return [failures[0].to_event(turn_id)]
        self.degraded = False
        self.rebuilds += 1
        return [
            EventRow(
                service="memory",
                operation="rebuild",
                status_code="OK",
                detail=f"re-stored {len(rows)} messages from the audit database",
                latency_ms=round(latency, 3),
                turn_id=turn_id,
            )
        ]


class SessionContext:
    """What every agent of one session shares: IDs, clients and the memory bookkeeping."""

    def __init__(
        self, session_id: str, config: HeistConfig, mesh: ServiceMesh, llm: LLMClient, audit: AuditStore
    ) -> None:
        self.session_id = session_id
        self.config = config
        self.mesh = mesh
        self.llm = llm
        self.audit = audit
        self.metadata = session_metadata(session_id)
        self.memory_sync = MemorySync(mesh, audit, session_id, self.metadata)


def _elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _speaker_label(agent_name: str) -> str:
    """How an agent appears in a transcript: ``safecracker`` -> ``Safecracker``."""
    return agent_name.replace("_", " ").title()


_SUBSTITUTED_TOOL = re.compile(r"\[[\w-]+: .*? -> .*\]")
"""A tool marker after ``_inline_tools`` replaced it: ``[tool: argument -> outcome]``."""


@functools.lru_cache(maxsize=4096)
def _one_line(text: str, limit: int = 240) -> str:
    """Flatten a message to one transcript line, without tool markers or their results.

    A newline would end the speaker's turn, and a 270M model copies whatever
    bracket syntax or tool output it sees in the lines before (measured: once
    a result is in the transcript, most later turns parrot it). So the
    transcript keeps only what was said; the full results stay in the audit.
    Cached: every turn re-renders the same recent lines.
    """
    flat = _SUBSTITUTED_TOOL.sub("", " ".join(text.split()))
    flat = " ".join(flat.replace("[", " ").replace("]", " ").split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _parrots(reply: str, spoken: Sequence[str]) -> bool:
    """Whether a reply is empty or (nearly) a copy of a line already in the transcript."""
    said = _one_line(reply).lower()
    return not said or any(
        difflib.SequenceMatcher(None, said, line.lower()).ratio() > PARROT_SIMILARITY for line in spoken
    )


def _last_full_sentence(text: str) -> str:
    """Cut a reply that ran out of tokens back to its last complete sentence (if it has one)."""
    end = max(text.rfind(mark) for mark in ".!?")
    return text[: end + 1] if end > 0 else text


def _close_prefill(prefill: str, continuation: str) -> str:
    """Join a prefilled marker opening and the model's continuation, closing the marker if the line ended first."""
    if not prefill:
        return continuation
    if "]" not in continuation:
        continuation += "]"
    return (prefill + continuation).strip()


class IntegratedAgent:
    """One crew member wired to every service of the mesh."""

    def __init__(self, config: AgentConfig, session: SessionContext) -> None:
        self.config = config
        self.session = session
        registry = session.mesh.registry
        self._allowed = frozenset(config.tools)
        self._scopes = tuple(sorted(set(config.scopes) | set(registry.scopes_for(config.tools))))
        self._functions = registry.functions_for(config.tools)
        self._inline_methods = tuple(
            method for tool in config.tools if (method := registry.service(tool).inline_method) is not None
        )
        self._system_prompt = self._compose_system_prompt(with_inline_tools=False)
        self._system_prompt_inline = self._compose_system_prompt(with_inline_tools=True)
        self._transcript_tools = self._compose_transcript_tools()
        self._tool_metadata: tuple[str, Metadata] | None = None
        self._turns_taken = 0

    @property
    def name(self) -> str:
        """The agent's name."""
        return self.config.name

    def _compose_system_prompt(self, with_inline_tools: bool) -> str:
        prompt = self.config.system_prompt + (SABOTEUR_BRIEF if self.config.is_saboteur else "")
        if not with_inline_tools or not self.config.tools:
            return prompt
        lines = [f"- {method.tool}: {method.description}" for method in self._inline_methods]
        example_tool = self.config.tools[0]
        return (
            f"{prompt}\nTo use a tool, write [TOOL:<tool>:<argument>] in your reply, "
            f"for example [TOOL:{example_tool}:...]. Your tools:\n" + "\n".join(lines)
        )

    def _compose_transcript_tools(self) -> str:
        """Build the transcript's tool brief: a description and an example line per tool ('' without tools)."""
        if not self._inline_methods:
            return ""
        speaker = _speaker_label(self.name)
        return (
            f"{speaker} uses tools by writing a marker, and the result appears in the transcript:\n"
            + "\n".join(f"{m.tool}: {m.description}" for m in self._inline_methods)
            + "\nFor example:\n"
            + "\n".join(f"{speaker}: [TOOL:{m.tool}:{m.inline_example}]" for m in self._inline_methods)
        )

    async def fetch_memory(self) -> MemoryFetch:
        """Fetch the agent's compressed memory; failures are returned, not raised (safe to prefetch)."""
        memory_config = self.session.config.session.memory
        try:
            summary = await self.session.mesh.memory.compressed(
                self.name, memory_config.recent_count, memory_config.max_chars, self.session.metadata
            )
        except ServiceCallError as exc:
            self.session.memory_sync.degraded = True
            return MemoryFetch(error=exc)
        return MemoryFetch(summary=summary)

    async def take_turn(
        self, turn_id: int, history: Sequence[ConversationMessage], memory: Awaitable[MemoryFetch] | None = None
    ) -> TurnResult:
        """Play one turn and persist it; raises only AuditError (the audit database is unusable)."""
        start = time.perf_counter()
        trace_id = start_trace()  # every RPC from here on (this task) carries it as traceparent
        audit = TurnAudit()
        result = TurnResult(turn_id, self.name, self.config.role, "", "ok", audit.tool_usage, audit.events)
        result.trace_id = trace_id

        fetched = await (memory if memory is not None else self.fetch_memory())
        if fetched.error is not None:
            audit.events.append(fetched.error.to_event(turn_id, self.name))

        token = await self._token(turn_id, audit) if self.config.tools else None
        llm_config = self.session.config.llm
        llm_start = time.perf_counter()
        try:
            if llm_config.prompt_style == "transcript":
                prefill = self._tool_prefill() if token is not None else ""
                prompt, spoken = self._transcript_prompt(history, fetched.summary, with_tools=token is not None)
                completion = await self.session.llm.complete_text(prompt + prefill)
                for boost in PARROT_RESAMPLE_BOOSTS:
                    if prefill or not _parrots(completion.content, spoken):
                        break
                    # Tiny models often repeat an earlier line; a hotter resample usually breaks the loop.
                    completion = await self.session.llm.complete_text(prompt, temperature_boost=boost)
                said = (
                    _last_full_sentence(completion.content)
                    if completion.truncated and not prefill
                    else completion.content
                )
                reply = _close_prefill(prefill, said) or NO_REPLY
                result.message = await self._inline_tools(turn_id, reply, token, audit)
            else:
                inline = token is not None and llm_config.tool_calling != "native"
                messages = self._build_messages(history, fetched.summary, inline=inline)
                result.message = await self._converse(turn_id, messages, token, audit)
        except LLMError as exc:
            result.status = "llm_error"
            result.message = f"Error generating response: {exc.status_code}: {exc.detail}"
            audit.events.append(
                EventRow(
                    "llm", "chat.completions", exc.status_code, exc.detail, round(exc.latency_ms, 3), turn_id, self.name
                )
            )
        result.llm_ms = _elapsed_ms(llm_start) - sum(row.latency_ms or 0.0 for row in audit.tool_usage)

        audit.message = MessageRow(
            turn_id,
            self.name,
            self.config.role,
            result.message,
            result.status,
            round(_elapsed_ms(start), 3),
            trace_id=trace_id,
        )
        await self._persist(turn_id, result.message, audit)
        result.total_ms = _elapsed_ms(start)
        return result

    async def _token(self, turn_id: int, audit: TurnAudit) -> str | None:
        try:
            return await self.session.mesh.tokens.token(self.config.oauth_client, self._scopes, self.session.metadata)
        except ServiceCallError as exc:
            audit.events.append(exc.to_event(turn_id, self.name))
            audit.events.append(
                EventRow(
                    "orchestrator",
                    "tools_disabled",
                    exc.status_code,
                    f"{self.name} speaks without tools this turn: no OAuth token ({exc.detail})",
                    None,
                    turn_id,
                    self.name,
                )
            )
            return None

    def _build_messages(
        self, history: Sequence[ConversationMessage], memory: str, inline: bool
    ) -> list[dict[str, Any]]:
        session_config = self.session.config.session
        system = self._system_prompt_inline if inline else self._system_prompt
        if memory:
            system = f"{system}\nYour notes from earlier turns:\n{memory}"
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": system},
            {"role": "user", "content": f"[briefing]: {session_config.objective}"},
        ]
        recent = history[-session_config.context_messages :] if session_config.context_messages else ()
        messages.extend({"role": "user", "content": f"[{m.agent_name}]: {m.message}"} for m in recent)
        messages.append({"role": "user", "content": f"Your turn, {self.name} ({self.config.role}). Reply briefly."})
        return messages

    def _tool_prefill(self) -> str:
        """Return the opening of a tool marker that starts every ``prefill_tool_every``-th line ("" otherwise).

        A 270M base model almost never starts a marker on its own, but given
        "[TOOL:calculator:" it writes a sensible argument; the tool call is then
        real (and can fail like any other), only its timing is prompted.
        """
        every = self.session.config.llm.prefill_tool_every
        self._turns_taken += 1
        if not every or not self._inline_methods or (self._turns_taken - 1) % every:
            return ""
        return f" [TOOL:{self._inline_methods[0].tool}:"

    def _transcript_prompt(
        self, history: Sequence[ConversationMessage], memory: str, with_tools: bool
    ) -> tuple[str, list[str]]:
        """Render the meeting so far as a plain transcript ending in "<Speaker>:", for a base model to continue.

        A base model has no notion of system prompts or turns; what it does well is
        continue a document. So the brief, the tool convention (shown by example
        lines, which small models imitate far better than instructions) and the
        recent conversation become one transcript, one line per speaker.
        """
        session_config = self.session.config.session
        speaker = _speaker_label(self.name)
        brief = self.config.system_prompt + (SABOTEUR_BRIEF if self.config.is_saboteur else "")
        parts = [
            "The following is the transcript of a heist crew's planning meeting. "
            f"{session_config.objective} Each crew member speaks in one or two short sentences.",
            f"About {speaker} ({self.config.role}): {brief}",
        ]
        if with_tools and self._transcript_tools:
            parts.append(self._transcript_tools)
        notes = [note for line in memory.splitlines() if (note := _one_line(line)) and not note.endswith(":")]
        if notes:
            parts.append(f"{speaker}'s notes from earlier turns:\n" + "\n".join(notes))
        recent = history[-session_config.context_messages :] if session_config.context_messages else ()
        spoken = [(m.agent_name, said) for m in recent if (said := _one_line(m.message))]
        lines = [f"{_speaker_label(name)}: {said}" for name, said in spoken]
        parts.append("Transcript:\n" + "\n".join([*lines, f"{speaker}:"]))
        return "\n\n".join(parts), [said for _, said in spoken]

    async def _converse(self, turn_id: int, messages: list[dict[str, Any]], token: str | None, audit: TurnAudit) -> str:
        """LLM plus tool calls, per ``llm.tool_calling``.

        native: tools are offered as functions, results go back for a final answer.
        inline: no functions; ``[TOOL:name:argument]`` markers are executed and replaced by results.
        auto: functions are offered; if the reply has tool_calls it is native, otherwise markers are honoured.
        """
        llm = self.session.llm
        mode = self.session.config.llm.tool_calling
        offer_functions = token is not None and mode in ("native", "auto") and bool(self._functions)
        completion = await llm.complete(messages, self._functions if offer_functions else None)
        if completion.tool_calls:
            return await self._native_rounds(turn_id, messages, completion, token, audit)
        if mode == "native":
            return completion.content
        return await self._inline_tools(turn_id, completion.content, token, audit)

    async def _native_rounds(
        self, turn_id: int, messages: list[dict[str, Any]], completion: Completion, token: str | None, audit: TurnAudit
    ) -> str:
        llm = self.session.llm
        max_rounds = self.session.config.llm.max_tool_rounds
        conversation = list(messages)
        rounds = 0
        while completion.tool_calls and rounds < max_rounds:
            rounds += 1
            conversation.append(completion.assistant_message())
            results = await asyncio.gather(
                *(self._native_call(turn_id, call.name, call.arguments, token, audit) for call in completion.tool_calls)
            )
            conversation.extend(
                {"role": "tool", "tool_call_id": call.call_id, "content": text}
                for call, text in zip(completion.tool_calls, results, strict=True)
            )
            completion = await llm.complete(conversation, self._functions, final=rounds >= max_rounds)
        if completion.content:
            return completion.content
        used = "; ".join(f"{row.tool_name}.{row.operation} -> {row.tool_result}" for row in audit.tool_usage)
        return f"(no text; tool results: {used})"

    async def _native_call(
        self, turn_id: int, function: str, arguments: str, token: str | None, audit: TurnAudit
    ) -> str:
        method = self.session.mesh.registry.method_by_function(function)
        if method is None:
            reason = f"unknown tool function {function!r}"
            return self._refuse(turn_id, function, function, arguments, NOT_ALLOWED, reason, audit)
        try:
            request = method.parse_arguments(arguments)
        except ToolArgumentError as exc:
            return self._refuse(turn_id, method.tool, method.method.name, arguments, INVALID_ARGUMENT, str(exc), audit)
        return await self._call_tool(turn_id, method, request, token, audit)

    async def _inline_tools(self, turn_id: int, text: str, token: str | None, audit: TurnAudit) -> str:
        markers = find_inline_tool_calls(text)
        if not markers:
            return text
        registry = self.session.mesh.registry
        outcomes: dict[int, str] = {}
        pending: dict[int, Awaitable[str]] = {}
        for index, marker in enumerate(markers):
            service = registry.services.get(marker.tool)
            method = service.inline_method if service is not None else None
            if method is None:
                reason = f"unknown tool {marker.tool!r}"
                outcomes[index] = self._refuse(
                    turn_id, marker.tool, "inline", marker.argument, NOT_ALLOWED, reason, audit
                )
            else:
                request = method.inline_request(marker.argument)
                pending[index] = self._call_tool(turn_id, method, request, token, audit, plain=True)
        outcomes.update(zip(pending, await asyncio.gather(*pending.values()), strict=True))
        for index, marker in enumerate(markers):
            outcome = outcomes[index]
            text = text.replace(marker.marker, f"[{marker.tool}: {marker.argument} -> {outcome}]", 1)
        return text

    def _refuse(
        self, turn_id: int, tool: str, operation: str, params: str, code: str, reason: str, audit: TurnAudit
    ) -> str:
        """Record a tool call that was never sent (not allowed, bad arguments, no token)."""
        audit.tool_usage.append(ToolUsageRow(turn_id, self.name, tool, operation, params, reason, False, code, 0.0))
        audit.events.append(EventRow(tool, operation, code, reason, 0.0, turn_id, self.name))
        return f"error: {reason}"

    def _metadata_for(self, token: str) -> Metadata:
        cached = self._tool_metadata
        if cached is None or cached[0] != token:
            cached = (token, tool_metadata(self.session.session_id, token))
            self._tool_metadata = cached
        return cached[1]

    async def _call_tool(
        self,
        turn_id: int,
        method: ToolMethod,
        request: Message,
        token: str | None,
        audit: TurnAudit,
        *,
        plain: bool = False,
    ) -> str:
        """Call one tool RPC (if allowed and authorized) and record it in ``tool_usage``."""
        params = json.dumps(json_format.MessageToDict(request, preserving_proto_field_name=True), ensure_ascii=False)
        operation = method.method.name
        if method.tool not in self._allowed:
            return self._refuse(
                turn_id,
                method.tool,
                operation,
                params,
                NOT_ALLOWED,
                f"{self.name} is not allowed to use {method.tool}",
                audit,
            )
        if token is None:
            return self._refuse(
                turn_id, method.tool, operation, params, NO_TOKEN, f"{self.name} has no OAuth token this turn", audit
            )
        mesh = self.session.mesh
        service = mesh.services[method.tool]
        rpc = getattr(mesh.tool_stubs[method.tool], operation)
        start = time.perf_counter()
        try:
            response = await service.call(operation, rpc, request, self._metadata_for(token))
        except ServiceCallError as exc:
            if exc.status_code == "UNAUTHENTICATED":
                mesh.tokens.invalidate(self.config.oauth_client)
            reason = "circuit open" if exc.circuit_open else f"{exc.status_code}: {exc.detail}"
            audit.tool_usage.append(
                ToolUsageRow(
                    turn_id,
                    self.name,
                    method.tool,
                    operation,
                    params,
                    reason,
                    False,
                    exc.status_code,
                    round(exc.latency_ms, 3),
                )
            )
            audit.events.append(exc.to_event(turn_id, self.name))
            return f"error: {reason}"
        text = render_result(response, self.session.config.session.tool_result_max_chars, plain=plain)
        audit.tool_usage.append(
            ToolUsageRow(
                turn_id, self.name, method.tool, operation, params, text, True, "OK", round(_elapsed_ms(start), 3)
            )
        )
        return text

    async def _persist(self, turn_id: int, message: str, audit: TurnAudit) -> None:
        """Audit write (must succeed) concurrently with StoreMemory (may fail, then audited)."""
        session = self.session
        write = session.audit.write_turn(session.session_id, audit)
        store = self._store_memory(turn_id, message)
        _, outcome = await asyncio.gather(write, store)
        session.memory_sync.record_written(self.name)
        if isinstance(outcome, ServiceCallError):
            session.memory_sync.degraded = True
            late_events = [outcome.to_event(turn_id, self.name)]
        else:
            late_events = await session.memory_sync.after_store(self.name, outcome, turn_id)
        if late_events:
            audit.events.extend(late_events)
            await session.audit.add_events(session.session_id, late_events)

    async def _store_memory(self, turn_id: int, message: str) -> int | ServiceCallError:
        try:
            return await self.session.mesh.memory.store(self.name, turn_id, message, self.session.metadata)
        except ServiceCallError as exc:
            return exc
