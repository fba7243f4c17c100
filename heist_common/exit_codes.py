"""Exit codes with one meaning each, shared by the ``orchestrator`` CLI, the supervisor and ``make``."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What a non-zero exit means, whichever command returned it."""

    OK = 0
    FAILED = 1
    """The work failed: a session ended ``failed``, a service did not start, a file could not be written."""
    USAGE = 2
    """Bad command-line arguments (argparse's own code)."""
    CONFIG = 3
    """The config file is unreadable or invalid."""
    DATABASE = 4
    """The audit database cannot be opened."""
    UNKNOWN_SESSION = 5
    """No such session in the audit database."""
    UNHEALTHY = 6
    """A service (or the LLM) is down: ``health``, ``status``, ``run --require-healthy``."""
    NOT_RESUMABLE = 7
    """``resume`` refused: the session is completed, still running, or was just taken over by another resume."""
    INTERRUPTED = 130
    """Ctrl-C or SIGTERM; the session is marked ``interrupted``."""
