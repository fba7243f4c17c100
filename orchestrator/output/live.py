"""The line ``orchestrator run`` redraws in place on a terminal while a turn runs.

Why a thread: the elapsed time must move while the event loop waits on the
model (or is busy), and phase changes arrive on the loop only when something
happens. The thread redraws every ``interval_s``; phase changes redraw at once;
a finished turn's lines replace the live line. Everything written to the
stream goes through one lock, so a redraw never lands in the middle of a
turn's lines. Only for a terminal: the caller decides (logs and pipes get
the turn lines alone).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

from orchestrator.output.text import strip_controls
from orchestrator.turn.progress import Phase, PhaseChange

__all__ = ["LiveLine", "describe"]

ERASE = "\r\x1b[K"
"""Back to the start of the line, and clear it (ANSI: understood by every terminal emulator in use)."""
WORDS = {
    Phase.MEMORY: "recalling memory",
    Phase.THINKING: "thinking",
    Phase.TOOL: "calling",
    Phase.WRITING: "writing to the audit",
}


def describe(change: PhaseChange) -> str:
    """``[turn 3] safecracker (Safecracker) 4.2s calling calculator.Evaluate``."""
    doing = f"{WORDS[change.phase]} {change.detail}".strip()
    who = strip_controls(f"{change.agent} ({change.role})")
    return f"[turn {change.turn_id}] {who} {change.elapsed_s:.1f}s {strip_controls(doing)} ..."


class LiveLine:
    """A ``TurnProgress`` observer that keeps one redrawn line at the bottom of a terminal."""

    def __init__(self, stream: TextIO, interval_s: float = 0.2) -> None:
        self._stream = stream
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._current: PhaseChange | None = None
        self._drawn = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._redraw_until_stopped, name="live-line", daemon=True)

    def __enter__(self) -> LiveLine:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stopped.set()
        self._thread.join(timeout=2)
        with self._lock:
            self._current = None
            self._erase()

    def __call__(self, change: PhaseChange) -> None:
        """Show a phase change now."""
        with self._lock:
            self._current = change
            self._draw()

    def replace(self, write: Callable[[], None]) -> None:
        """Erase the live line and run ``write`` (a finished turn's lines) where it was."""
        with self._lock:
            self._current = None
            self._erase()
            write()
            self._stream.flush()

    def _redraw_until_stopped(self) -> None:
        while not self._stopped.wait(self._interval_s):
            with self._lock:
                if self._current is not None:
                    self._draw()

    def _draw(self) -> None:
        assert self._current is not None
        width = shutil.get_terminal_size().columns - 1  # never wrap: a wrapped line cannot be redrawn in place
        try:
            self._stream.write(ERASE + describe(self._current)[: max(width, 20)])
            self._stream.flush()
        except (OSError, ValueError):  # the terminal went away (closed, hung up): the run carries on without it
            self._current = None
        else:
            self._drawn = True

    def _erase(self) -> None:
        if self._drawn:
            try:
                self._stream.write(ERASE)
                self._stream.flush()
            except (OSError, ValueError):
                pass
            self._drawn = False
