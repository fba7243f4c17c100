"""Exit codes with one meaning each, shared by the ``orchestrator`` CLI, the supervisor and ``make``.

docs/cli.md's exit-code table is generated from the docstrings below (``make docs``).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What a non-zero exit means, whichever command returned it."""

    OK = 0
    """Done: the session ``completed``, every service is healthy, the file was written."""
    FAILED = 1
    """The work failed: a session ended ``failed`` (the LLM cannot answer, the audit database became unwritable,
    the token budget was spent), a service did not start, a file could not be written."""
    USAGE = 2
    """Bad command-line arguments (argparse's own code; also ``--turns`` out of range or an unknown ``--db``
    scheme)."""
    CONFIG = 3
    """The config file is unreadable or invalid (the message names the key and the file), credentials are
    missing, or ``resume`` finds the config no longer gives the session's schedule."""
    DATABASE = 4
    """The audit database cannot be opened (nothing is created in a folder that does not exist)."""
    UNKNOWN_SESSION = 5
    """No such session in the audit database."""
    UNHEALTHY = 6
    """Something is down: a service or the LLM for ``orchestrator health`` and ``python -m servers.supervisor
    status``; a gRPC service for ``run`` or ``resume --require-healthy``, before any turn (an LLM that cannot
    answer is exit 1)."""
    NOT_RESUMABLE = 7
    """``resume`` refused: the session is completed or degraded, still running, or another resume just took it."""
    DEGRADED = 8
    """The session ran every turn and ended ``degraded``: the crew could not use a service, every call it tried
    to make to it failed (``orchestrator.session.runner.unusable_services``); the summary names the service and the
    cause. Not resumable (no turn is left): run a new session once the service works."""
    NOT_PENDING = 9
    """``approve`` or ``deny``: the session has no such tool call waiting for a decision (an unknown call ID, or
    one already decided: the message says by whom and when)."""
    INTERRUPTED = 130
    """Ctrl-C, or SIGTERM during ``run`` and ``resume``: the session is marked ``interrupted`` and can be resumed."""
