"""LLM token totals of a session, per agent and in all, summed from its ``messages`` rows.

Why from the rows: the audit is the single source of truth, so the summary,
``sessions``, ``show``, the report and a resumed session's budget all add up
the same committed turns, and cannot disagree with them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TokenCount", "TokenTotals"]


@dataclass(slots=True)
class TokenCount:
    """Prompt and completion tokens; ``estimated`` when any part of them is an estimate."""

    prompt: int = 0
    completion: int = 0
    estimated: bool = False
    counted_turns: int = 0
    """Turns with a count (turns written before tokens were counted, or with no answered request, have none)."""

    @property
    def total(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt + self.completion

    def add(self, prompt: int, completion: int, estimated: bool) -> None:
        """Add one turn's counts."""
        self.prompt += prompt
        self.completion += completion
        self.estimated = self.estimated or estimated
        self.counted_turns += 1

    def describe(self) -> str:
        """``1234 (1000 prompt + 234 completion)``, with ``~`` in front when estimated in part."""
        mark = "~" if self.estimated else ""
        return f"{mark}{self.total} ({mark}{self.prompt} prompt + {mark}{self.completion} completion)"


@dataclass(slots=True)
class TokenTotals:
    """A session's tokens in all and per agent (agents in the order they first spoke)."""

    session: TokenCount = field(default_factory=TokenCount)
    agents: dict[str, TokenCount] = field(default_factory=dict)

    def add(self, agent: str, prompt: int, completion: int, estimated: bool) -> None:
        """Add one turn's counts to the session and to its agent."""
        self.session.add(prompt, completion, estimated)
        self.agents.setdefault(agent, TokenCount()).add(prompt, completion, estimated)

    def describe_agents(self) -> str:
        """``planner ~1200, hacker 800`` (agents in the order they first spoke; ``~``: estimated in part)."""
        return ", ".join(f"{name} {'~' if count.estimated else ''}{count.total}" for name, count in self.agents.items())

    def agent(self, name: str) -> TokenCount:
        """Return the agent's count (zero when it has none)."""
        return self.agents.get(name) or TokenCount()

    @classmethod
    def from_messages(cls, messages: Iterable[Mapping[str, Any]]) -> TokenTotals:
        """Sum ``messages`` rows; rows without a count are skipped.

        A row is a dict with ``agent_name``, ``prompt_tokens``, ``completion_tokens`` and ``tokens_estimated``.
        """
        totals = cls()
        for row in messages:
            prompt, completion = row.get("prompt_tokens"), row.get("completion_tokens")
            if prompt is None or completion is None:
                continue
            totals.add(str(row["agent_name"]), int(prompt), int(completion), bool(row.get("tokens_estimated")))
        return totals
