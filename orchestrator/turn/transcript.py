"""The transcript prompt style: a small base model continues the meeting's transcript by one line.

Tool calls are inline markers; a marker the turn prefills or the model opens
gets its argument generated under the tool's grammar (``tools.argument_grammars``),
then the line goes on freely. Each request is a step of the turn.
"""

from __future__ import annotations

from collections.abc import Sequence

from heist_common.config import AgentConfig
from heist_common.tools.argument_grammars import ToolConstraint
from heist_common.tools.registry import ToolMethod
from orchestrator.llm.client import LLMError
from orchestrator.tools import markers
from orchestrator.turn import prompts
from orchestrator.turn.constrained_tools import accepts
from orchestrator.turn.context import SessionContext
from orchestrator.turn.style import PromptStyle
from orchestrator.turn.tool_calls import ToolCaller
from orchestrator.turn.turn import Turn

__all__ = ["MAX_CONSTRAINED_MARKERS", "PARROT_RESAMPLE_BOOSTS", "TranscriptStyle"]

PARROT_RESAMPLE_BOOSTS = (0.3, 0.6)
"""Temperature added for each resample of a parroted reply (at most this many resamples)."""
MAX_CONSTRAINED_MARKERS = 2
"""Tool markers per transcript line whose argument is generated under the tool's grammar (two requests each)."""


class TranscriptStyle(PromptStyle):
    """One agent's transcript lines: prompt, tool prefill, constrained markers."""

    def __init__(
        self, agent: AgentConfig, context: SessionContext, tools: ToolCaller, inline_methods: Sequence[ToolMethod]
    ) -> None:
        super().__init__(agent, context, tools, inline_methods)
        self._inline_tools = frozenset(method.tool for method in inline_methods)
        self._tool_brief = prompts.transcript_tool_brief(agent.name, inline_methods)

    def _tool_prefill(self) -> str:
        """Return the opening of a tool marker that starts every ``prefill_tool_every``-th line ("" otherwise).

        A 270M base model almost never starts a marker on its own, but given
        "[TOOL:calculator:" it writes a sensible argument; the tool call is then
        real (and can fail like any other), only its timing is prompted.
        """
        if not self._tool_call_prompted() or not self._inline_methods:
            return ""
        return " " + markers.opening(self._inline_methods[0].tool)

    async def reply(self, turn: Turn) -> str:
        """Write one transcript line; every tool marker it opens gets its argument under that tool's grammar.

        A marker is open when the turn prefills it or the model writes one: the
        line is cut right after ``[TOOL:<tool>:``, the argument is generated
        under the grammar (ending in ``]``), and the line then continues freely
        in a request of its own. Each request is a step of the turn.
        """
        llm = self.context.llm
        token = turn.token
        prefill = self._tool_prefill() if token is not None else ""
        brief = self._tool_brief if token is not None else ""
        session_config = self.context.config.session
        prompt, spoken = prompts.transcript_prompt(self.agent, session_config, turn.history, turn.memory, brief)
        line, settled = prefill, 0
        if not prefill:
            line = await self._free_line(prompt, spoken, turn)
        constrain = token is not None and self.context.constrained.active("grammar")
        for _ in range(MAX_CONSTRAINED_MARKERS if constrain else 0):
            opening = self._open_marker(line, settled)
            if opening is None or token is None:
                break
            start, tool = opening
            constraint = await self.context.constrained.inline(tool, self.tools.listing_fetcher(token))
            if constraint is None:  # nothing to name now, or the server rejected grammars
                break
            written = markers.PATTERN.match(line, start)
            if written is not None and accepts(constraint, written.group(2)):
                settled = written.end()  # the model's own argument is already one the grammar allows
                continue
            opened = line[:start] + markers.opening(tool)
            argument = await self._constrained_argument(turn, prompt + opened, constraint)
            if argument is None:  # the server rejected grammars (audited once)
                break
            settled_line = opened + argument
            line, settled = settled_line, len(settled_line)
            rest = turn.spent(await llm.complete_text(prompt + settled_line))
            said = prompts.last_full_sentence(rest.content) if rest.truncated else rest.content
            if said:
                line = f"{settled_line} {said}"
        if prefill and not settled:  # the prefilled argument went unconstrained: the model continues it freely
            completion = turn.spent(await llm.complete_text(prompt + prefill))
            line = prompts.close_prefill(prefill, completion.content)
        elif settled and self.context.constrained.active("grammar"):
            opening = self._open_marker(line, settled)
            if opening is not None:  # one marker too many: keep what was said before it, not an unchecked call
                line = line[: opening[0]]
        # An empty line stays empty: the agent records the turn as ``empty`` (prompts.NO_REPLY in the conversation).
        return await self.tools.inline(turn, line.strip())

    async def _free_line(self, prompt: str, spoken: Sequence[str], turn: Turn) -> str:
        """Sample the model's own line, hotter while it parrots an earlier one; returns " text" or ""."""
        llm = self.context.llm
        completion = turn.spent(await llm.complete_text(prompt))
        empty_resampled = False
        for boost in PARROT_RESAMPLE_BOOSTS:
            if not prompts.parrots(completion.content, spoken):
                break
            if not completion.content:
                if empty_resampled:  # an empty line is resampled once; still empty, the turn is ``empty``
                    break
                empty_resampled = True
            # Tiny models often repeat an earlier line; a hotter resample usually breaks the loop.
            completion = turn.spent(await llm.complete_text(prompt, temperature_boost=boost))
        said = prompts.last_full_sentence(completion.content) if completion.truncated else completion.content
        return f" {said}" if said else ""

    def _open_marker(self, line: str, after: int) -> tuple[int, str] | None:
        """Return (start, tool) of the first marker opened at or after ``after`` for one of the agent's inline tools."""
        for match in markers.OPENING.finditer(line, after):
            if match.group(1) in self._inline_tools:
                return match.start(), match.group(1)
        return None

    async def _constrained_argument(self, turn: Turn, prompt: str, constraint: ToolConstraint) -> str | None:
        """Generate the argument of the marker ``prompt`` ends with, under the grammar, through its ``]``.

        None when the server rejected the grammar under ``auto`` (audited once).
        """
        max_tokens = max(self.context.config.llm.max_tokens, constraint.max_bytes or 0)
        try:
            completion = await self.context.llm.complete_text(
                prompt, extra_body=constraint.completion_extra_body(), max_tokens=max_tokens
            )
        except LLMError as exc:
            self.context.fall_back("grammar", exc, turn)
            return None
        argument = turn.spent(completion).content
        # Under the grammar it ends at its "]"; a server that ignored the field may have gone on (the rest is dropped).
        closing = argument.find(markers.CLOSE)
        return argument[: closing + 1] if closing >= 0 else markers.close(argument)
