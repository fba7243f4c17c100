"""One agent's turn over every service, where no single failure can end the session.

A turn: compressed memory (usually prefetched) -> OAuth token (cached) -> LLM,
with tool calls over gRPC -> audit write (the source of truth) concurrently
with StoreMemory. Each step's failure is caught, becomes an ``events`` row, and
the turn carries on in a degraded way: no memory, no tools, or the error text as
the message. Only an unwritable audit database stops the run, because then
nothing could be trusted afterwards. Prompts are built by ``orchestrator.turn.prompts``,
tool calls made by ``orchestrator.turn.tool_calls``, memory kept in step with the
audit by ``orchestrator.mesh.memory_sync``; tool arguments are generated under the
constraints ``orchestrator.turn.constrained_tools`` chooses (``llm.constrained_tools``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

from heist_common.config import AgentConfig, HeistConfig
from orchestrator.audit import AuditStore, EventRow, MessageRow, ToolUsageRow, TurnAudit
from orchestrator.llm.client import Completion, LLMClient, LLMError
from orchestrator.mesh.clients import ServiceCallError, ServiceClients, session_metadata
from orchestrator.mesh.memory_sync import MemoryFetch, MemorySync
from orchestrator.tools import markers
from orchestrator.tools.argument_grammars import ToolConstraint
from orchestrator.tracing import TurnScope, timings_json, turn_scope
from orchestrator.turn import prompts
from orchestrator.turn.constrained_tools import ConstrainedTools, Dialect, accepts
from orchestrator.turn.prompts import ConversationMessage
from orchestrator.turn.tool_calls import ToolCaller

__all__ = ["ConversationMessage", "CrewAgent", "MemoryFetch", "SessionContext", "TurnResult"]

PARROT_RESAMPLE_BOOSTS = (0.3, 0.6)
"""Temperature added for each resample of a parroted reply (at most this many resamples)."""
MAX_CONSTRAINED_MARKERS = 2
"""Tool markers per transcript line whose argument is generated under the tool's grammar (two requests each)."""


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
    """Time spent waiting for the model (the sum of its requests)."""
    total_ms: float = 0.0
    trace_id: str = ""

    @property
    def service_ms(self) -> float:
        """Time spent outside the LLM: memory, OAuth, tools, audit and StoreMemory."""
        return self.total_ms - self.llm_ms


class SessionContext:
    """What every agent of one session shares: IDs, clients and the memory bookkeeping."""

    def __init__(
        self, session_id: str, config: HeistConfig, clients: ServiceClients, llm: LLMClient, audit: AuditStore
    ) -> None:
        self.session_id = session_id
        self.config = config
        self.clients = clients
        self.llm = llm
        self.audit = audit
        self.metadata = session_metadata(session_id)
        self.memory_sync = MemorySync(clients, audit, session_id, self.metadata)
        # Grammars sized to a turn's max_tokens, so that a constrained argument always fits one request.
        self.constrained = ConstrainedTools(
            config.llm.constrained_tools, clients.registry, max_bytes=config.llm.max_tokens
        )


def _elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class CrewAgent:
    """One crew member of a session: its prompts, its token, its tools, its turns."""

    def __init__(self, config: AgentConfig, session: SessionContext) -> None:
        self.config = config
        self.session = session
        registry = session.clients.registry
        self._scopes = tuple(sorted(set(config.scopes) | set(registry.scopes_for(config.tools))))
        self._functions = registry.functions_for(config.tools)
        self._methods = [method for tool in config.tools for method in registry.service(tool).methods]
        inline_methods = tuple(
            method for tool in config.tools if (method := registry.service(tool).inline_method) is not None
        )
        self._inline_methods = inline_methods
        self._inline_tools = frozenset(method.tool for method in inline_methods)
        self._system_prompt = prompts.system_prompt(config, ())
        self._system_prompt_inline = prompts.system_prompt(config, inline_methods)
        self._transcript_tools = prompts.transcript_tool_brief(config.name, inline_methods)
        self.tools = ToolCaller(
            session.clients,
            session.session_id,
            config.name,
            config.oauth_client,
            frozenset(config.tools),
            session.config.session.tool_result_max_chars,
            constraints=session.constrained.cache,
        )
        self._turns_taken = 0

    @property
    def name(self) -> str:
        """The agent's name."""
        return self.config.name

    async def fetch_memory(self) -> MemoryFetch:
        """Fetch the agent's compressed memory; failures are returned, not raised (safe to prefetch)."""
        memory_config = self.session.config.session.memory
        try:
            summary = await self.session.clients.memory.compressed(
                self.name, memory_config.recent_count, memory_config.max_chars, self.session.metadata
            )
        except ServiceCallError as exc:
            self.session.memory_sync.degraded = True
            return MemoryFetch(error=exc)
        return MemoryFetch(summary=summary)

    def continue_after(self, turns_taken: int) -> None:
        """Pick up a resumed session's tool-prefill cadence where the agent's earlier turns left it."""
        self._turns_taken = turns_taken

    async def take_turn(
        self, turn_id: int, history: Sequence[ConversationMessage], memory: Awaitable[MemoryFetch] | None = None
    ) -> TurnResult:
        """Play one turn and persist it; raises only AuditError (the audit database is unusable).

        The turn is one trace (``orchestrator.tracing``): every RPC and LLM
        request made from here on reports to it, and its timeline is audited.
        """
        session = self.session
        with turn_scope(session.clients.tracer, session.session_id, self.name, turn_id) as scope:
            return await self._take_turn(turn_id, history, memory, scope)

    async def _take_turn(
        self,
        turn_id: int,
        history: Sequence[ConversationMessage],
        memory: Awaitable[MemoryFetch] | None,
        scope: TurnScope,
    ) -> TurnResult:
        start = time.perf_counter()
        trace_id = scope.trace_id
        audit = TurnAudit()
        result = TurnResult(turn_id, self.name, self.config.role, "", "ok", audit.tool_usage, audit.events)
        result.trace_id = trace_id

        if memory is None:
            fetched = await self.fetch_memory()
        else:  # prefetched during the previous turn: only the rest of its wait counts here
            waited = time.perf_counter()
            fetched = await memory
            code = fetched.error.status_code if fetched.error is not None else "OK"
            scope.record("memory", "prefetched memory (wait)", waited, code)
        if fetched.error is not None:
            audit.events.append(fetched.error.to_event(turn_id, self.name))

        token = await self._token(turn_id, audit, scope) if self.config.tools else None
        try:
            if self.session.config.llm.prompt_style == "transcript":
                result.message = await self._transcript_turn(turn_id, history, fetched.summary, token, audit, result)
            else:
                result.message = await self._chat_turn(turn_id, history, fetched.summary, token, audit, result)
        except LLMError as exc:
            result.llm_ms += exc.latency_ms
            result.status = "llm_error"
            result.message = f"Error generating response: {exc.status_code}: {exc.detail}"
            audit.events.append(
                EventRow(
                    "llm", "chat.completions", exc.status_code, exc.detail, round(exc.latency_ms, 3), turn_id, self.name
                )
            )
        audit.message = MessageRow(
            turn_id,
            self.name,
            self.config.role,
            result.message,
            result.status,
            round(_elapsed_ms(start), 3),
            trace_id=trace_id,
            timings=timings_json(scope.steps, _elapsed_ms(start)),
        )
        await self._persist(turn_id, result.message, audit, scope)
        result.total_ms = _elapsed_ms(start)
        # The whole timeline, audit write and StoreMemory included, rides on the next audit transaction.
        self.session.audit.update_timings(self.session.session_id, turn_id, timings_json(scope.steps, result.total_ms))
        return result

    async def _token(self, turn_id: int, audit: TurnAudit, scope: TurnScope) -> str | None:
        tokens = self.session.clients.tokens
        started, issued = time.perf_counter(), tokens.issued_count
        try:
            token = await tokens.token(self.config.oauth_client, self._scopes, self.session.metadata)
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
        if tokens.issued_count == issued:  # no IssueToken RPC (which is a step of its own): the cache answered
            scope.record("token", "token (cached)", started)
        return token

    @staticmethod
    def _timed(result: TurnResult, completion: Completion) -> Completion:
        """Count a completion's latency as LLM time (requests in one turn are sequential)."""
        result.llm_ms += completion.latency_ms
        return completion

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
        return " " + markers.opening(self._inline_methods[0].tool)

    async def _transcript_turn(
        self,
        turn_id: int,
        history: Sequence[ConversationMessage],
        memory: str,
        token: str | None,
        audit: TurnAudit,
        result: TurnResult,
    ) -> str:
        """One transcript line; every tool marker it opens gets its argument under that tool's grammar.

        A marker is open when the turn prefills it or the model writes one: the
        line is cut right after ``[TOOL:<tool>:``, the argument is generated
        under the grammar (ending in ``]``), and the line then continues freely
        in a request of its own. Each request is a step of the turn.
        """
        llm = self.session.llm
        prefill = self._tool_prefill() if token is not None else ""
        brief = self._transcript_tools if token is not None else ""
        prompt, spoken = prompts.transcript_prompt(self.config, self.session.config.session, history, memory, brief)
        line, settled = prefill, 0
        if not prefill:
            line = await self._free_line(prompt, spoken, result)
        constrain = token is not None and self.session.constrained.active("grammar")
        for _ in range(MAX_CONSTRAINED_MARKERS if constrain else 0):
            opening = self._open_marker(line, settled)
            if opening is None or token is None:
                break
            start, tool = opening
            constraint = await self.session.constrained.inline(tool, self.tools.listing_fetcher(token))
            if constraint is None:  # nothing to name now, or the server rejected grammars
                break
            written = markers.PATTERN.match(line, start)
            if written is not None and accepts(constraint, written.group(2)):
                settled = written.end()  # the model's own argument is already one the grammar allows
                continue
            opened = line[:start] + markers.opening(tool)
            argument = await self._constrained_argument(turn_id, prompt + opened, constraint, audit, result)
            if argument is None:  # the server rejected grammars (audited once)
                break
            settled_line = opened + argument
            line, settled = settled_line, len(settled_line)
            rest = self._timed(result, await llm.complete_text(prompt + settled_line))
            said = prompts.last_full_sentence(rest.content) if rest.truncated else rest.content
            if said:
                line = f"{settled_line} {said}"
        if prefill and not settled:  # the prefilled argument went unconstrained: the model continues it freely
            completion = self._timed(result, await llm.complete_text(prompt + prefill))
            line = prompts.close_prefill(prefill, completion.content)
        elif settled and self.session.constrained.active("grammar"):
            opening = self._open_marker(line, settled)
            if opening is not None:  # one marker too many: keep what was said before it, not an unchecked call
                line = line[: opening[0]]
        reply = line.strip() or prompts.NO_REPLY
        return await self.tools.inline(turn_id, reply, token, audit)

    async def _free_line(self, prompt: str, spoken: Sequence[str], result: TurnResult) -> str:
        """Sample the model's own line, hotter while it parrots an earlier one; returns " text" or ""."""
        llm = self.session.llm
        completion = self._timed(result, await llm.complete_text(prompt))
        for boost in PARROT_RESAMPLE_BOOSTS:
            if not prompts.parrots(completion.content, spoken):
                break
            # Tiny models often repeat an earlier line; a hotter resample usually breaks the loop.
            completion = self._timed(result, await llm.complete_text(prompt, temperature_boost=boost))
        said = prompts.last_full_sentence(completion.content) if completion.truncated else completion.content
        return f" {said}" if said else ""

    def _open_marker(self, line: str, after: int) -> tuple[int, str] | None:
        """Return (start, tool) of the first marker opened at or after ``after`` for one of the agent's inline tools."""
        for match in markers.OPENING.finditer(line, after):
            if match.group(1) in self._inline_tools:
                return match.start(), match.group(1)
        return None

    async def _constrained_argument(
        self, turn_id: int, prompt: str, constraint: ToolConstraint, audit: TurnAudit, result: TurnResult
    ) -> str | None:
        """Generate the argument of the marker ``prompt`` ends with, under the grammar, through its ``]``.

        None when the server rejected the grammar under ``auto`` (audited once).
        """
        max_tokens = max(self.session.config.llm.max_tokens, constraint.max_bytes or 0)
        try:
            completion = await self.session.llm.complete_text(
                prompt, extra_body=constraint.completion_extra_body(), max_tokens=max_tokens
            )
        except LLMError as exc:
            self._fall_back("grammar", exc, turn_id, audit, result)
            return None
        argument = self._timed(result, completion).content
        # Under the grammar it ends at its "]"; a server that ignored the field may have gone on (the rest is dropped).
        closing = argument.find(markers.CLOSE)
        return argument[: closing + 1] if closing >= 0 else markers.close(argument)

    async def _chat_turn(
        self,
        turn_id: int,
        history: Sequence[ConversationMessage],
        memory: str,
        token: str | None,
        audit: TurnAudit,
        result: TurnResult,
    ) -> str:
        """LLM plus tool calls, per ``llm.tool_calling``.

        native: tools are offered as functions, results go back for a final answer.
        inline: no functions; ``[TOOL:name:argument]`` markers are executed and replaced by results.
        auto: functions are offered; if the reply has tool_calls it is native, otherwise markers are honoured.
        Constraints (``llm.constrained_tools``): offered functions are strict definitions (json_schema);
        without functions, the reply's markers are constrained by a whole-reply grammar (grammar).
        """
        llm_config = self.session.config.llm
        mode = llm_config.tool_calling
        inline = token is not None and mode != "native"
        system = self._system_prompt_inline if inline else self._system_prompt
        messages = prompts.chat_messages(self.config, system, history, memory, self.session.config.session)
        offer_functions = token is not None and mode in ("native", "auto") and bool(self._functions)
        functions = self._functions if offer_functions else None
        constrained = self.session.constrained
        grammar: str | None = None
        if token is not None and offer_functions and constrained.active("json_schema"):
            functions = await constrained.strict_functions(self._methods, self.tools.listing_fetcher(token))
        elif token is not None and inline and not offer_functions:
            tools = [method.tool for method in self._inline_methods]
            grammar = await constrained.chat_grammar(tools, self.tools.listing_fetcher(token))
        completion, functions = await self._chat_completion(
            turn_id, messages, functions, audit, result, grammar=grammar
        )
        if completion.tool_calls:
            return await self._native_rounds(turn_id, messages, completion, functions, token, audit, result)
        if mode == "native":
            return completion.content
        return await self.tools.inline(turn_id, completion.content, token, audit)

    async def _native_rounds(
        self,
        turn_id: int,
        messages: list[dict[str, Any]],
        completion: Completion,
        functions: list[dict[str, Any]] | None,
        token: str | None,
        audit: TurnAudit,
        result: TurnResult,
    ) -> str:
        max_rounds = self.session.config.llm.max_tool_rounds
        conversation = list(messages)
        rounds = 0
        while completion.tool_calls and rounds < max_rounds:
            rounds += 1
            conversation.append(completion.assistant_message())
            results = await asyncio.gather(
                *(self.tools.native(turn_id, call.name, call.arguments, token, audit) for call in completion.tool_calls)
            )
            conversation.extend(
                {"role": "tool", "tool_call_id": call.call_id, "content": text}
                for call, text in zip(completion.tool_calls, results, strict=True)
            )
            completion, functions = await self._chat_completion(
                turn_id, conversation, functions or self._functions, audit, result, final=rounds >= max_rounds
            )
        if completion.content:
            return completion.content
        used = "; ".join(f"{row.tool_name}.{row.operation} -> {row.tool_result}" for row in audit.tool_usage)
        return f"(no text; tool results: {used})"

    def _fall_back(self, dialect: Dialect, exc: LLMError, turn_id: int, audit: TurnAudit, result: TurnResult) -> None:
        """Drop a dialect the server rejected (audited once), counting the request; re-raise any other error."""
        event = self.session.constrained.fall_back(dialect, exc, turn_id, self.name)
        result.llm_ms += exc.latency_ms
        if event is not None:
            audit.events.append(event)

    async def _chat_completion(
        self,
        turn_id: int,
        messages: list[dict[str, Any]],
        functions: list[dict[str, Any]] | None,
        audit: TurnAudit,
        result: TurnResult,
        *,
        final: bool = False,
        grammar: str | None = None,
    ) -> tuple[Completion, list[dict[str, Any]] | None]:
        """One chat request; a constraint the server rejects (``auto``) is dropped and the request sent again.

        Returns the completion and the functions to offer from now on.
        """
        llm = self.session.llm
        extra_body = {"grammar": grammar} if grammar is not None else None
        try:
            completion = await llm.complete(messages, functions, final=final, extra_body=extra_body)
            return self._timed(result, completion), functions
        except LLMError as exc:
            strict = functions is not None and functions is not self._functions
            if grammar is None and not strict:
                raise
            self._fall_back("grammar" if grammar else "json_schema", exc, turn_id, audit, result)
        plain = self._functions if functions is not None else None
        return self._timed(result, await llm.complete(messages, plain, final=final)), plain

    async def _persist(self, turn_id: int, message: str, audit: TurnAudit, scope: TurnScope) -> None:
        """Audit write (must succeed) concurrently with StoreMemory (may fail, then audited)."""
        session = self.session
        write = self._timed_write(audit, scope)
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

    async def _timed_write(self, audit: TurnAudit, scope: TurnScope) -> None:
        started = time.perf_counter()
        code = "ERROR"
        try:
            await self.session.audit.write_turn(self.session.session_id, audit)
            code = "OK"
        finally:
            scope.record("audit", "write_turn", started, code)

    async def _store_memory(self, turn_id: int, message: str) -> int | ServiceCallError:
        try:
            return await self.session.clients.memory.store(self.name, turn_id, message, self.session.metadata)
        except ServiceCallError as exc:
            return exc
