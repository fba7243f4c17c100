"""What a turn is doing while it runs: one typed event at each phase change, for whoever shows it live.

Why: a turn lasts as long as the model takes (seconds, or half a minute on a
slow one), and the finished ``Turn`` arrives only at its end. The agent, its
prompt style and its tool caller report each phase change to the session's
``TurnProgress`` observer (``SessionRunner(on_progress=...)``): the CLI draws
its live line from it, and a service could stream it. Observers are called on
the event loop and must return at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Phase", "PhaseChange", "TurnProgress"]


class Phase(StrEnum):
    """What a turn is waiting for."""

    MEMORY = "memory"
    """The agent's compressed memory (usually prefetched during the previous turn) and its OAuth token."""
    THINKING = "thinking"
    """A completion from the model."""
    TOOL = "tool"
    """A tool RPC (``PhaseChange.detail`` names it: ``calculator.Evaluate``)."""
    WRITING = "writing"
    """The turn's audit transaction, and StoreMemory beside it."""


@dataclass(frozen=True, slots=True)
class PhaseChange:
    """A turn entered a phase."""

    session_id: str
    turn_id: int
    agent: str
    role: str
    phase: Phase
    started: float
    """When the turn started (``time.monotonic()``), so an observer can show how long it has run."""
    detail: str = ""

    @property
    def elapsed_s(self) -> float:
        """Seconds since the turn started, now."""
        return time.monotonic() - self.started


TurnProgress = Callable[[PhaseChange], None]
"""An observer of phase changes (the turn's end is the runner's ``on_turn``)."""
