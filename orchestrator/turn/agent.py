"""One agent's turn over every service, where no single failure can end the session.

A turn: compressed memory (usually prefetched) -> OAuth token (cached) -> LLM,
with tool calls over gRPC -> audit write (the source of truth) concurrently
with StoreMemory. Each step's failure is caught, becomes an ``events`` row, and
the turn carries on in a degraded way: no memory, no tools, or the error text as
the message. Only an unwritable audit database stops the run, because then
nothing could be trusted afterwards.

What the model is asked and how its tool calls are read is the prompt style's
(``turn.transcript`` or ``turn.chat``, by ``llm.prompt_style``); the tool calls
themselves are ``turn.tool_calls``; everything lands on one ``turn.Turn``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence
from typing import Any

from heist_common.audit import EventRow, TurnAudit
from heist_common.config import AgentConfig
from orchestrator.llm.client import LLMError
from orchestrator.mesh.clients import ServiceCallError
from orchestrator.mesh.memory_sync import MemoryFetch
from orchestrator.tracing import TurnScope, elapsed_ms, timings_json, turn_scope
from orchestrator.turn.chat import ChatStyle
from orchestrator.turn.context import SessionContext
from orchestrator.turn.progress import Phase
from orchestrator.turn.prompts import NO_REPLY, ConversationMessage
from orchestrator.turn.style import PromptStyle
from orchestrator.turn.tool_calls import ToolCaller
from orchestrator.turn.transcript import TranscriptStyle
from orchestrator.turn.turn import LLM_ERROR, Turn

__all__ = ["ConversationMessage", "CrewAgent", "MemoryFetch", "SessionContext", "Turn"]


class CrewAgent:
    """One crew member of a session: its prompts, its token, its tools, its turns."""

    def __init__(self, config: AgentConfig, session: SessionContext) -> None:
        self.config = config
        self.session = session
        registry = session.clients.registry
        self._scopes = tuple(sorted(set(config.scopes) | set(registry.scopes_for(config.tools))))
        inline_methods = tuple(
            method for tool in config.tools if (method := registry.service(tool).inline_method) is not None
        )
        self.tools = ToolCaller(
            session.clients,
            session.session_id,
            config.name,
            config.oauth_client,
            frozenset(config.tools),
            session.config.session.tool_result_max_chars,
            constraints=session.constrained.cache,
            audit=session.audit,
            gate=session.approvals,
            require_approval=frozenset(config.require_approval),
            on_call=lambda turn, tool: session.progress_at(turn, Phase.TOOL, tool),
        )
        # The session's prompt style is fixed by its config, so each agent builds only that one.
        style: type[PromptStyle] = TranscriptStyle if session.config.llm.prompt_style == "transcript" else ChatStyle
        self.style = style(config, session, self.tools, inline_methods)

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
        """Pick up a resumed session's tool-prefill (or forcing) cadence where the agent's earlier turns left it."""
        self.style.continue_after(turns_taken)

    async def take_turn(
        self,
        turn_id: int,
        history: Sequence[ConversationMessage],
        memory: Awaitable[MemoryFetch] | None = None,
        leftovers: Sequence[dict[str, Any]] = (),
    ) -> Turn:
        """Play one turn and persist it; raises only AuditError (the audit database is unusable).

        The turn is one trace (``orchestrator.tracing``): every RPC and LLM
        request made from here on reports to it, and its timeline is audited.
        """
        session = self.session
        with turn_scope(session.clients.tracer, session.session_id, self.name, turn_id) as scope:
            turn = Turn(turn_id, self.name, self.config.role, history, trace_id=scope.trace_id, steps=scope.steps)
            return await self._take_turn(turn, memory, scope, leftovers)

    async def _take_turn(
        self, turn: Turn, memory: Awaitable[MemoryFetch] | None, scope: TurnScope, leftovers: Sequence[dict[str, Any]]
    ) -> Turn:
        start = time.perf_counter()
        progress = self.session.progress_at
        progress(turn, Phase.MEMORY)
        if memory is None:
            fetched = await self.fetch_memory()
        else:  # prefetched during the previous turn: only the rest of its wait counts here
            waited = time.perf_counter()
            fetched = await memory
            code = fetched.error.status_code if fetched.error is not None else "OK"
            scope.record("memory", "prefetched memory (wait)", waited, code)
        turn.memory = fetched.summary
        if fetched.error is not None:
            turn.events.append(fetched.error.to_event(turn.turn_id, self.name))

        turn.token = await self._token(turn, scope) if self.config.tools else None
        if leftovers:
            # The turn a dead process left: its calls are finished (never sent twice), the model is told how
            # they ended, and it speaks without tools, so the resumed turn makes no call of its own.
            notes = await self.tools.settle(turn, list(leftovers))
            turn.memory = "\n".join([*notes, turn.memory]) if turn.memory else "\n".join(notes)
            turn.token = None
        progress(turn, Phase.THINKING)
        try:
            turn.message = await self.style.reply(turn)
            if not turn.message.strip():  # the style already resampled it once
                turn.stayed_empty(NO_REPLY)
        except LLMError as exc:
            turn.llm_ms += exc.latency_ms
            turn.status = LLM_ERROR
            turn.message = f"Error generating response: {exc.status_code}: {exc.detail}"
            turn.events.append(
                EventRow(
                    "llm",
                    "chat.completions",
                    exc.status_code,
                    exc.detail,
                    round(exc.latency_ms, 3),
                    turn.turn_id,
                    self.name,
                )
            )
        so_far = elapsed_ms(start)
        progress(turn, Phase.WRITING)
        await self._persist(turn, turn.audit_rows(so_far, timings_json(scope.steps, so_far)), scope)
        turn.total_ms = elapsed_ms(start)
        # The whole timeline, audit write and StoreMemory included, rides on the next audit transaction.
        timings = timings_json(scope.steps, turn.total_ms)
        self.session.audit.update_timings(self.session.session_id, turn.turn_id, timings)
        return turn

    async def _token(self, turn: Turn, scope: TurnScope) -> str | None:
        tokens = self.session.clients.tokens
        started, issued = time.perf_counter(), tokens.issued_count
        try:
            token = await tokens.token(self.config.oauth_client, self._scopes, self.session.metadata)
        except ServiceCallError as exc:
            turn.events.append(exc.to_event(turn.turn_id, self.name))
            turn.events.append(
                EventRow(
                    "orchestrator",
                    "tools_disabled",
                    exc.status_code,
                    f"{self.name} speaks without tools this turn: no OAuth token ({exc.detail})",
                    None,
                    turn.turn_id,
                    self.name,
                )
            )
            return None
        if tokens.issued_count == issued:  # no IssueToken RPC (which is a step of its own): the cache answered
            scope.record("token", "token (cached)", started)
        return token

    async def _persist(self, turn: Turn, audit: TurnAudit, scope: TurnScope) -> None:
        """Audit write (must succeed) concurrently with StoreMemory (may fail, then audited)."""
        session = self.session
        turn_id = turn.turn_id
        write = self._timed_write(audit, scope)
        store = self._store_memory(turn_id, turn.message)
        _, outcome = await asyncio.gather(write, store)
        session.memory_sync.record_written(self.name)
        if isinstance(outcome, ServiceCallError):
            session.memory_sync.degraded = True
            late_events = [outcome.to_event(turn_id, self.name)]
        else:
            late_events = await session.memory_sync.after_store(self.name, outcome, turn_id)
        if late_events:
            turn.events.extend(late_events)
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
