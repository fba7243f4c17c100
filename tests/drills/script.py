"""Drill scripting: the scripted LLM answers each turn for the agent whose turn it is, after that turn's actions.

``DrillScript`` runs the actions registered for a turn *before* replying, so "kill
the calculator at turn 3" happens after turn 3's memory/OAuth steps and before
its tool call, every time.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

from tests.support.scripted_llm import Reply, inline_tool, text

START_TIMEOUT_S = 15.0
TOOL_OF = {
    "hacker": ("file_reader", "bank_layout.md"),
    "safecracker": ("calculator", "6*7"),
    "mole": ("database_query", "SELECT COUNT(*) FROM guards"),
}
"""What each tool agent asks for on its turns (an inline ``[TOOL:...]`` marker)."""
TURN_ORDER = ("planner", "hacker", "safecracker", "mole")
AGENT_OF_PROMPT = re.compile(r"Your turn, (\w+) \(")


class DrillScript:
    """Answers every chat request for the agent whose turn it is; runs per-turn actions first.

    In inline tool mode every turn makes exactly one chat request, so the n-th
    request is turn n. ``at(3, action)`` runs ``action`` (kill, freeze, start...)
    in the LLM's HTTP thread while turn 3 waits for its reply.
    """

    def __init__(self, replies: dict[str, Callable[[int], Reply]] | None = None) -> None:
        self.turn = 0
        self.agents: list[str] = []
        self._actions: dict[int, list[Callable[[], object]]] = {}
        self._replies = replies or {}
        self._overrides: dict[int, Reply] = {}
        self._lock = threading.Lock()
        self.errors: list[BaseException] = []

    def at(self, turn: int, action: Callable[[], object]) -> DrillScript:
        self._actions.setdefault(turn, []).append(action)
        return self

    def reply_at(self, turn: int, reply: Reply) -> DrillScript:
        """Answer turn ``turn`` with ``reply`` (an HTTP error, a hang...) instead of the agent's usual line."""
        self._overrides[turn] = reply
        return self

    def __call__(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            self.turn += 1
            turn = self.turn
            match = AGENT_OF_PROMPT.search(str(body["messages"][-1]["content"]))
            agent = match.group(1) if match else "?"
            self.agents.append(agent)
        for action in self._actions.get(turn, []):
            try:
                action()
            except BaseException as exc:  # surfaced by the test, not swallowed by the HTTP thread
                self.errors.append(exc)
                raise
        if turn in self._overrides:
            return self._overrides[turn]
        if agent in self._replies:
            return self._replies[agent](turn)
        if agent in TOOL_OF:
            tool, argument = TOOL_OF[agent]
            return inline_tool(tool, argument, before=f"Turn {turn}: checking.")
        return text(f"Turn {turn}: {agent} says we go on Friday.")


def drill_resilience(threshold: int = 3, reset_s: float = 1.0) -> dict[str, Any]:
    """The ``resilience`` section the drills run with (small numbers so a drill takes seconds)."""
    return {
        "health_timeout_s": 0.5,
        "grpc_retry": {"max_attempts": 2, "initial_backoff_s": 0.01, "max_backoff_s": 0.05},
        "circuit_breaker": {"failure_threshold": threshold, "reset_timeout_s": reset_s},
    }
