"""One agent turn as one value: what it started from, what it did, and what it cost.

Why one value: a turn used to travel as a bundle of six arguments (its id, the
history, the memory, the token, the rows it wrote, its result) and exist in
three shapes copied field by field. The pipeline fills a ``Turn``; the audit
rows, the next turn's conversation line and the session summary are derived
from it, so they cannot disagree.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from heist_common.audit import EventRow, MessageRow, ToolUsageRow, TurnAudit
from orchestrator.llm.client import Completion
from orchestrator.tracing import Step
from orchestrator.turn.prompts import ConversationMessage

__all__ = ["EMPTY", "EMPTY_RESAMPLE_BOOST", "LLM_ERROR", "OK", "Turn"]

OK = "ok"
"""Status of a turn the model answered."""
LLM_ERROR = "llm_error"
"""Status of a turn whose LLM request failed."""
EMPTY = "empty"
"""Status of a turn whose reply was empty (or whitespace) even after a hotter resample: not an answer."""
EMPTY_RESAMPLE_BOOST = 0.3
"""Temperature added to the one resample of an empty reply (chat; transcript lines share the parrot boosts)."""


@dataclass(slots=True)
class Turn:
    """One agent's turn, filled in as it runs; its rows are committed in one transaction at its end."""

    turn_id: int
    agent_name: str
    agent_role: str
    history: Sequence[ConversationMessage] = ()
    """The conversation before this turn (read only)."""
    memory: str = ""
    """The agent's compressed notes, as the memory service returned them ("" when it could not)."""
    token: str | None = None
    """The agent's OAuth token for its tools; None: it speaks without tools this turn."""
    message: str = ""
    status: str = OK
    """``OK``, ``LLM_ERROR`` or ``EMPTY``."""
    tool_usage: list[ToolUsageRow] = field(default_factory=list)
    events: list[EventRow] = field(default_factory=list)
    llm_ms: float = 0.0
    """Time spent waiting for the model (the sum of its requests, which are sequential)."""
    llm_requests: int = 0
    """Model requests answered in this turn (resamples and constrained arguments are requests of their own)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Tokens of all those requests, summed."""
    tokens_estimated: bool = False
    """At least one of them had no usage from the server: the sums include estimates (``llm.usage``)."""
    total_ms: float = 0.0
    trace_id: str = ""
    started: float = field(default_factory=time.monotonic)
    """When the turn started (``time.monotonic()``): live progress shows how long it has run."""
    steps: list[Step] = field(default_factory=list)
    """The turn's timeline: every RPC (also those skipped or sent without a token) and LLM request, with its outcome.

    The same list its ``TurnScope`` records into, so a call that ends after the
    turn (the next speaker's memory prefetch) still lands here.
    """
    calls_made: int = 0
    """Tool calls given an id so far (``next_call_id``)."""

    @property
    def service_ms(self) -> float:
        """Time spent outside the LLM: memory, OAuth, tools, audit and StoreMemory."""
        return self.total_ms - self.llm_ms

    @property
    def tokens(self) -> int:
        """Prompt and completion tokens of the turn."""
        return self.prompt_tokens + self.completion_tokens

    def spent(self, completion: Completion) -> Completion:
        """Count a completion's latency as LLM time and its tokens as the turn's, and hand it back."""
        self.llm_ms += completion.latency_ms
        usage = completion.usage
        self.llm_requests += 1
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.tokens_estimated = self.tokens_estimated or usage.estimated
        return completion

    def stayed_empty(self, message: str) -> None:
        """Record a reply that was empty even after its resample: status ``EMPTY`` and an ``llm`` event.

        An empty reply is not an answer: the summary counts it as an error and
        the runner's LLM breaker as a failed turn. ``message`` is what the
        conversation shows for it.
        """
        self.status = EMPTY
        self.message = message
        self.events.append(
            EventRow(
                "llm",
                "reply",
                "EMPTY",
                "the model's reply was empty, also when resampled",
                None,
                self.turn_id,
                self.agent_name,
            )
        )

    def refused(self, tool: str, operation: str, params: str, code: str, reason: str) -> None:
        """Record a tool call that was never sent (not allowed, bad arguments, no token)."""
        agent = self.agent_name
        self.tool_usage.append(ToolUsageRow(self.turn_id, agent, tool, operation, params, reason, False, code, 0.0))
        self.events.append(EventRow(tool, operation, code, reason, 0.0, self.turn_id, agent))

    def next_call_id(self) -> str:
        """Return the next tool call's id, ``<turn>.<index>`` (unique in the session; what ``x-call-id`` carries)."""
        self.calls_made += 1
        return f"{self.turn_id}.{self.calls_made}"

    def skip_call_ids(self, index: int) -> None:
        """Never hand out an index up to ``index`` again (a resumed turn's calls follow those its dead run made)."""
        self.calls_made = max(self.calls_made, index)

    def as_message(self) -> ConversationMessage:
        """Return the line this turn adds to the conversation."""
        return ConversationMessage(self.turn_id, self.agent_name, self.agent_role, self.message)

    def audit_rows(self, latency_ms: float, timings: str) -> TurnAudit:
        """Return everything the turn writes: its message, its tool calls and its events."""
        message = MessageRow(
            self.turn_id,
            self.agent_name,
            self.agent_role,
            self.message,
            self.status,
            round(latency_ms, 3),
            trace_id=self.trace_id,
            timings=timings,
        )
        if self.llm_requests:  # NULL: no request was answered, so nothing is known of its tokens
            message.prompt_tokens = self.prompt_tokens
            message.completion_tokens = self.completion_tokens
            message.tokens_estimated = self.tokens_estimated
        return TurnAudit(message, self.tool_usage, self.events)
