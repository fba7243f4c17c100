"""A zero-latency LLM client object, in the orchestrator's process, for measuring the mesh alone.

The HTTP hop to a model server is LLM cost, not mesh cost, so the per-turn and
parallel-session benchmarks replace ``LLMClient`` with this object: it answers
at once, and its reply completes the tool-marker prefill (``prefill_tool_every:
1``), so every turn of a tool agent makes exactly one real tool RPC.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from heist_common.config import LLMConfig
from orchestrator.llm.client import Completion, LLMClient
from orchestrator.mesh.clients import HealthResult

ARGUMENTS = {
    "calculator": "(120-15)*3",
    "file_reader": "vault_time_lock.md",
    "database_query": "SELECT COUNT(*) FROM guards",
}
"""What each tool is asked on every turn (the rest of a ``[TOOL:<tool>:`` prefill)."""


class InstantLLM(LLMClient):
    """``LLMClient`` that never leaves the process; ``delay_s`` > 0 simulates model time with a sleep."""

    def __init__(self, config: LLMConfig, delay_s: float = 0.0) -> None:
        super().__init__(config)
        self.delay_s = delay_s
        self.calls = 0

    async def complete_text(
        self,
        prompt: str,
        *,
        temperature_boost: float = 0.0,
        extra_body: Mapping[str, Any] | None = None,
        max_tokens: int | None = None,
    ) -> Completion:
        """Finish the prefilled tool marker at the end of ``prompt`` (or say something if there is none).

        A ``grammar`` in ``extra_body`` is not applied: the arguments are valid ones already.
        """
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        opening = prompt.rfind("[TOOL:")
        if opening >= 0 and "]" not in prompt[opening:]:
            tool = prompt[opening + len("[TOOL:") :].split(":", 1)[0]
            return Completion(content=f"{ARGUMENTS.get(tool, '1+1')}] done.")
        return Completion(content=f"Noted, step {self.calls}.")

    async def complete(
        self,
        messages: list[dict[str, Any]],
        tools: Any = None,
        *,
        final: bool = False,
        extra_body: Mapping[str, Any] | None = None,
    ) -> Completion:
        """Chat style is not used by the benchmarks; answer plainly."""
        self.calls += 1
        return Completion(content=f"Noted, step {self.calls}.")

    async def check_health(self, timeout_s: float) -> HealthResult:
        """Always SERVING."""
        return HealthResult("llm", "in-process", "SERVING", 0.0)
