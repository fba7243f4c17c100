"""What the two prompt styles share: the agent, its session, its tool caller, and when a tool call is prompted.

A small model rarely calls a tool by itself, so every ``llm.prefill_tool_every``-th
turn of a tool agent prompts one: the transcript style by prefilling a marker,
the chat style by a ``tool_choice`` naming a function. Both count turns the same
way, and a resumed session picks the count up where it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence

from heist_common.config import AgentConfig
from heist_common.tools.registry import ToolMethod
from orchestrator.turn.context import SessionContext
from orchestrator.turn.tool_calls import ToolCaller
from orchestrator.turn.turn import Turn

__all__ = ["PromptStyle"]


class PromptStyle:
    """One agent's way of asking the model: the base of ``TranscriptStyle`` and ``ChatStyle``."""

    def __init__(
        self, agent: AgentConfig, context: SessionContext, tools: ToolCaller, inline_methods: Sequence[ToolMethod]
    ) -> None:
        self.agent = agent
        self.context = context
        self.tools = tools
        self._inline_methods = tuple(inline_methods)
        self._turns_taken = 0

    def continue_after(self, turns_taken: int) -> None:
        """Pick up a resumed session's cadence of prompted tool calls where the agent's earlier turns left it."""
        self._turns_taken = turns_taken

    async def reply(self, turn: Turn) -> str:
        """Ask the model for the turn's message (its tool calls made and recorded on ``turn``); LLMError on failure."""
        raise NotImplementedError

    def _tool_call_prompted(self) -> bool:
        """Count this turn; return whether it is one whose tool call is prompted (every ``prefill_tool_every``-th)."""
        every = self.context.config.llm.prefill_tool_every
        self._turns_taken += 1
        return bool(every) and (self._turns_taken - 1) % every == 0
