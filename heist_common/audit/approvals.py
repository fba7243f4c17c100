"""Deciding tool calls that wait for a person: the one API every front end uses (CLI, terminal prompt, A2A).

A call that needs approval is a ``tool_calls`` record in status
``pending_approval``; whoever decides writes ``approved`` or ``denied`` on it
with a compare and set, so two deciders cannot both win, and the process that
waits (or a later ``resume``) reads the decision from the audit. Nothing here
needs the deciding process and the waiting one to be the same, or both alive.
"""

from __future__ import annotations

import asyncio
import getpass
import time
from dataclasses import dataclass
from typing import Any, Literal

from heist_common.audit.schema import CallStatus
from heist_common.audit.store import AuditStore

__all__ = [
    "MAX_DECIDER_CHARS",
    "MAX_REASON_CHARS",
    "Decision",
    "PendingCall",
    "decide",
    "os_user",
    "pending_calls",
    "wait_for_pending",
]

MAX_REASON_CHARS = 1000
"""Longest reason a decider may give (it is shown to the model)."""
MAX_DECIDER_CHARS = 200
"""Longest name of who decided."""
WAIT_POLL_S = 0.5
"""How often ``wait_for_pending`` reads the audit."""


@dataclass(frozen=True)
class PendingCall:
    """A tool call waiting for a decision, as a front end shows it."""

    session_id: str
    call_id: str
    turn_id: int
    agent_name: str
    tool_name: str
    operation: str
    arguments: str
    """The request as JSON."""
    waiting_since: str

    @classmethod
    def from_record(cls, row: dict[str, Any]) -> PendingCall:
        """Build one from a ``tool_calls`` record (``AuditStore.read_tool_calls``)."""
        return cls(
            str(row["session_id"]), str(row["call_id"]), int(row["turn_id"]), str(row["agent_name"]),
            str(row["tool_name"]), str(row["operation"]), str(row["tool_params"]), str(row["created_at"]),
        )  # fmt: skip

    def as_json(self) -> dict[str, Any]:
        """Return the fields as JSON-ready data (``orchestrator approvals --json``; an A2A status message)."""
        return {
            "session_id": self.session_id,
            "call_id": self.call_id,
            "turn_id": self.turn_id,
            "agent": self.agent_name,
            "tool": self.tool_name,
            "method": self.operation,
            "arguments": self.arguments,
            "waiting_since": self.waiting_since,
        }


@dataclass(frozen=True)
class Decision:
    """What was decided about a call, by whom and when."""

    session_id: str
    call_id: str
    status: str
    """``approved`` or ``denied``."""
    decided_by: str
    decided_at: str
    reason: str


def os_user() -> str:
    """Who decides from this process: the OS user (what the audit records as ``decided_by``)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (containers)
        import os

        return f"uid {os.getuid()}"


def check_decision(reason: str, decided_by: str) -> None:
    """ValueError (one line) when a caller-supplied reason or name is too long or empty where it must not be."""
    if len(reason) > MAX_REASON_CHARS:
        raise ValueError(f"the reason is {len(reason)} characters long; at most {MAX_REASON_CHARS}")
    if not decided_by.strip() or len(decided_by) > MAX_DECIDER_CHARS:
        raise ValueError(f"who decided must be 1 to {MAX_DECIDER_CHARS} characters")


async def decide(
    audit: AuditStore,
    session_id: str,
    call_id: str,
    decision: Literal["approve", "deny"],
    reason: str = "",
    decided_by: str = "",
) -> Decision:
    """Approve or deny a pending call; the waiting process (or the next ``resume``) acts on it.

    Raises ValueError for a bad ``decision``, reason or name; UnknownSessionError,
    UnknownCallError, CallNotPendingError (decided already: the message says by
    whom); AuditError when the database fails.
    """
    if decision not in ("approve", "deny"):
        raise ValueError(f"decision must be 'approve' or 'deny', not {decision!r}")
    decided_by = decided_by or os_user()
    check_decision(reason, decided_by)
    row = await audit.decide(session_id, call_id, decision == "approve", reason, decided_by)
    return Decision(session_id, call_id, str(row["status"]), decided_by, str(row["decided_at"]), reason)


async def pending_calls(audit: AuditStore, session_id: str | None = None) -> list[PendingCall]:
    """Return the calls waiting for a decision, oldest first (of one session, or of all)."""
    rows = await audit.run_in_writer(lambda: audit.read_tool_calls(session_id, CallStatus.PENDING_APPROVAL))
    return [PendingCall.from_record(row) for row in rows]


async def wait_for_pending(audit: AuditStore, session_id: str, timeout_s: float) -> list[PendingCall]:
    """Wait until the session has a call waiting for a decision (at most ``timeout_s``); [] if none came.

    For a front end that runs the session elsewhere and must notice the pause
    (A2A: the task becomes INPUT_REQUIRED with the pending call).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        found = await pending_calls(audit, session_id)
        if found or time.monotonic() >= deadline:
            return found
        await asyncio.sleep(min(WAIT_POLL_S, max(0.0, deadline - time.monotonic())))
