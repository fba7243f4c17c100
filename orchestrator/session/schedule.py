"""Who speaks when: the turn schedule of a session.

The schedule is a lazy sequence of names (a long session costs nothing before
turn 1); the runner reads one speaker ahead, to prefetch that agent's memory
while the current one is talking. ``--seed`` reproduces a run exactly.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence

__all__ = ["OPENING_AGENT", "iter_schedule", "turn_schedule"]

OPENING_AGENT = "planner"
"""Who opens a ``random`` session (the first agent of the turn order if there is no planner)."""


def round_robin(turn_order: Sequence[str]) -> Iterator[str]:
    """Repeat the turn order."""
    return itertools.cycle(turn_order)


def random_order(turn_order: Sequence[str], seed: int | None) -> Iterator[str]:
    """Let the planner open, then a random other agent each turn, never the same one twice in a row."""
    rng = random.Random(seed)
    speaker = OPENING_AGENT if OPENING_AGENT in turn_order else turn_order[0]
    while True:
        yield speaker
        candidates = [name for name in turn_order if name != speaker] or list(turn_order)
        speaker = rng.choice(candidates)


def iter_schedule(strategy: str, turn_order: Sequence[str], turns: int, seed: int | None = None) -> Iterator[str]:
    """Agent names for turns 1..``turns`` under ``strategy`` (``round_robin`` or ``random``), one at a time."""
    if not turn_order:
        raise ValueError("turn order is empty")
    if strategy == "round_robin":
        return itertools.islice(round_robin(turn_order), turns)
    if strategy == "random":
        return itertools.islice(random_order(turn_order, seed), turns)
    raise ValueError(f"unknown turn strategy {strategy!r}")


def turn_schedule(strategy: str, turn_order: Sequence[str], turns: int, seed: int | None = None) -> list[str]:
    """Return the whole schedule as a list (for tests and short sessions)."""
    return list(iter_schedule(strategy, turn_order, turns, seed))
