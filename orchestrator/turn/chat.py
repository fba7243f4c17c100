"""The chat prompt style: system and user messages for an instruction-tuned model, with native or inline tool calls.

``llm.tool_calling`` says how tools are offered: as functions (native), as
``[TOOL:...]`` markers (inline), or functions first with markers honoured
(auto); ``llm.constrained_tools`` constrains them (strict function schemas, or a
whole-reply grammar for markers).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from heist_common.config import AgentConfig
from heist_common.tools.registry import ToolMethod, ToolRegistry
from orchestrator.llm.client import Completion, LLMError
from orchestrator.turn import prompts
from orchestrator.turn.context import SessionContext
from orchestrator.turn.progress import Phase
from orchestrator.turn.style import PromptStyle
from orchestrator.turn.tool_calls import ToolCaller
from orchestrator.turn.turn import EMPTY_RESAMPLE_BOOST, Turn

__all__ = ["ChatStyle"]


class ChatStyle(PromptStyle):
    """One agent's chat requests: the messages, the functions it is offered, the native tool rounds."""

    def __init__(
        self, agent: AgentConfig, context: SessionContext, tools: ToolCaller, inline_methods: Sequence[ToolMethod]
    ) -> None:
        super().__init__(agent, context, tools, inline_methods)
        registry: ToolRegistry = context.clients.registry
        self._functions = registry.functions_for(agent.tools)
        self._methods = [method for tool in agent.tools for method in registry.service(tool).methods]
        self._system_prompt = prompts.system_prompt(agent, ())
        self._system_prompt_inline = prompts.system_prompt(agent, inline_methods)
        # The function a forced turn calls: the inline tool's method (the one the transcript prefills), else the first.
        forced = self._inline_methods[0].function_name if self._inline_methods else None
        if forced is None and self._methods:
            forced = self._methods[0].function_name
        self._forced_function = forced

    def _tool_choice(self) -> str | None:
        """Return the function a call is forced to on every ``prefill_tool_every``-th turn (None otherwise).

        The chat counterpart of the transcript's marker prefill: a small model
        rarely calls a function by itself. The request offers that function
        alone with ``tool_choice: "required"`` (and no parallel calls), which
        llama.cpp's llama-server, vLLM and OpenAI all honour; llama-server
        ignores a named ``tool_choice`` object. Only the turn's first request
        is forced; the model answers the results freely.
        """
        return self._forced_function if self._tool_call_prompted() else None

    async def reply(self, turn: Turn) -> str:
        """LLM plus tool calls, per ``llm.tool_calling``.

        native: tools are offered as functions, results go back for a final answer.
        inline: no functions; ``[TOOL:name:argument]`` markers are executed and replaced by results.
        auto: functions are offered; if the reply has tool_calls it is native, otherwise markers are honoured.
        Constraints (``llm.constrained_tools``): offered functions are strict definitions (json_schema);
        without functions, the reply's markers are constrained by a whole-reply grammar (grammar).
        """
        llm_config = self.context.config.llm
        mode = llm_config.tool_calling
        token = turn.token
        inline = token is not None and mode != "native"
        system = self._system_prompt_inline if inline else self._system_prompt
        messages = prompts.chat_messages(self.agent, system, turn.history, turn.memory, self.context.config.session)
        offer_functions = token is not None and mode in ("native", "auto") and bool(self._functions)
        functions = self._functions if offer_functions else None
        constrained = self.context.constrained
        grammar: str | None = None
        if token is not None and offer_functions and constrained.active("json_schema"):
            functions = await constrained.strict_functions(self._methods, self.tools.listing_fetcher(token))
        elif token is not None and inline and not offer_functions:
            tools = [method.tool for method in self._inline_methods]
            grammar = await constrained.chat_grammar(tools, self.tools.listing_fetcher(token))
        choice = self._tool_choice() if token is not None else None
        forced = choice if functions is not None else None
        completion, functions = await self._chat_completion(turn, messages, functions, grammar=grammar, forced=forced)
        if not completion.content and not completion.tool_calls:
            # An empty reply is no answer; one hotter sample usually gives one (else the turn is ``empty``).
            completion, functions = await self._chat_completion(
                turn, messages, functions, grammar=grammar, forced=forced, temperature_boost=EMPTY_RESAMPLE_BOOST
            )
        if completion.tool_calls:
            return await self._native_rounds(turn, messages, completion, functions)
        if mode == "native":
            return completion.content
        return await self.tools.inline(turn, completion.content)

    async def _native_rounds(
        self,
        turn: Turn,
        messages: list[dict[str, Any]],
        completion: Completion,
        functions: list[dict[str, Any]] | None,
    ) -> str:
        max_rounds = self.context.config.llm.max_tool_rounds
        conversation = list(messages)
        rounds = 0
        while completion.tool_calls and rounds < max_rounds:
            rounds += 1
            conversation.append(completion.assistant_message())
            results = await asyncio.gather(
                *(self.tools.native(turn, call.name, call.arguments) for call in completion.tool_calls)
            )
            conversation.extend(
                {"role": "tool", "tool_call_id": call.call_id, "content": text}
                for call, text in zip(completion.tool_calls, results, strict=True)
            )
            self.context.progress_at(turn, Phase.THINKING)  # the model reads the results
            completion, functions = await self._chat_completion(
                turn, conversation, functions or self._functions, final=rounds >= max_rounds
            )
        if completion.content:
            return completion.content
        used = "; ".join(f"{row.tool_name}.{row.operation} -> {row.tool_result}" for row in turn.tool_usage)
        return f"(no text; tool results: {used})"

    async def _chat_completion(
        self,
        turn: Turn,
        messages: list[dict[str, Any]],
        functions: list[dict[str, Any]] | None,
        *,
        final: bool = False,
        grammar: str | None = None,
        forced: str | None = None,
        temperature_boost: float = 0.0,
    ) -> tuple[Completion, list[dict[str, Any]] | None]:
        """One chat request; a constraint the server rejects (``auto``) is dropped and the request sent again.

        ``forced``: the function the model must call (``_tool_choice``): offered alone, ``tool_choice: "required"``.

        Returns the completion and the functions to offer from now on.
        """
        llm = self.context.llm
        extra_body: dict[str, Any] = {"grammar": grammar} if grammar is not None else {}
        choice = "required" if forced is not None and functions else None
        if choice is not None:
            extra_body["parallel_tool_calls"] = False
        try:
            completion = await llm.complete(
                messages,
                _only(functions, forced),
                final=final,
                extra_body=extra_body or None,
                tool_choice=choice,
                temperature_boost=temperature_boost,
            )
            return turn.spent(completion), functions
        except LLMError as exc:
            strict = functions is not None and functions is not self._functions
            if grammar is None and not strict:
                raise
            self.context.fall_back("grammar" if grammar else "json_schema", exc, turn)
        plain = self._functions if functions is not None else None
        completion = await llm.complete(
            messages,
            _only(plain, forced),
            final=final,
            extra_body={"parallel_tool_calls": False} if choice is not None else None,
            tool_choice=choice,
            temperature_boost=temperature_boost,
        )
        return turn.spent(completion), plain


def _only(functions: list[dict[str, Any]] | None, name: str | None) -> list[dict[str, Any]] | None:
    """``functions`` narrowed to the one named ``name`` (all of them when ``name`` is None or not among them)."""
    if functions is None or name is None:
        return functions
    named = [function for function in functions if function.get("function", {}).get("name") == name]
    return named or functions
