"""Who speaks when: the turn schedule of a session.

The whole schedule is computed up front so the runner knows the next speaker
early (it prefetches that agent's memory while the current one is talking) and
so ``--seed`` reproduces a run exactly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = ["OPENING_AGENT", "turn_schedule"]

OPENING_AGENT = "planner"
"""Who opens a ``random`` session (the first agent of the turn order if there is no planner)."""


def round_robin(turn_order: Sequence[str], turns: int) -> list[str]:
    """Repeat the turn order."""
    return [turn_order[index % len(turn_order)] for index in range(turns)]


def random_order(turn_order: Sequence[str], turns: int, seed: int | None) -> list[str]:
    """Let the planner open, then a random other agent each turn, never the same one twice in a row."""
    rng = random.Random(seed)
    opener = OPENING_AGENT if OPENING_AGENT in turn_order else turn_order[0]
    schedule = [opener][:turns]
    while len(schedule) < turns:
        candidates = [name for name in turn_order if name != schedule[-1]] or list(turn_order)
        schedule.append(rng.choice(candidates))
    return schedule


def turn_schedule(strategy: str, turn_order: Sequence[str], turns: int, seed: int | None = None) -> list[str]:
    """Agent names for turns 1..``turns`` under ``strategy`` (``round_robin`` or ``random``)."""
    if not turn_order:
        raise ValueError("turn order is empty")
    if strategy == "round_robin":
        return round_robin(turn_order, turns)
    if strategy == "random":
        return random_order(turn_order, turns, seed)
    raise ValueError(f"unknown turn strategy {strategy!r}")
