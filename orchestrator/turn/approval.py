"""Waiting for a person to approve a tool call: the durable pause of one session, and its metrics.

The call's record (``pending_approval``) is already in the audit when the
gate is asked to wait, so the wait itself holds nothing that a ``kill -9``
could lose: the gate polls the record until someone decides (``orchestrator
approve``/``deny`` in another terminal, the A2A service, or the y/n prompt
this process shows on a terminal), or denies it itself once
``session.approval_timeout_s`` has passed since the call was recorded. While
any call waits, the session's status is ``awaiting_approval``.

Metrics (prometheus_client's default registry, so a long-running host such as
the A2A service exposes them with its own): ``heist_tool_approvals_pending``,
``heist_tool_approvals_decided_total{tool,decision}`` and
``heist_tool_approval_wait_seconds{tool,decision}`` (time to decision).
Labels are bounded: configured tools, and approved/denied/timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from heist_common.audit import AuditStore, CallNotPendingError, CallStatus
from heist_common.audit.approvals import PendingCall, os_user

__all__ = ["TIMEOUT_DECIDER", "ApprovalGate", "ApprovalHooks", "Prompter", "seconds_since"]

POLL_S = 0.25
"""How often a waiting call's record is read (a decision from another process shows within this)."""
HEARTBEAT_S = 30.0
"""How often a waiting session beats its heart, so ``resume`` elsewhere never takes it for dead."""
TIMEOUT_DECIDER = "timeout"
"""``decided_by`` of a call denied because nobody decided within ``session.approval_timeout_s``."""

Prompter = Callable[[PendingCall], Awaitable[bool | None]]
"""Ask a person in place: True approve, False deny, None no answer (input closed): the call waits on."""
Announcer = Callable[[PendingCall, float], None]
"""Say that a call waits, and how to decide it (the seconds left before the timeout)."""

PENDING = Gauge("heist_tool_approvals_pending", "Tool calls waiting for a person's approval.", ["tool"])
DECIDED = Counter(
    "heist_tool_approvals_decided", "Tool calls decided, by decision (approved, denied, timeout).", ["tool", "decision"]
)
WAITED = Histogram(
    "heist_tool_approval_wait_seconds",
    "Time from a call's approval request to its decision.",
    ["tool", "decision"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
)


@dataclass(frozen=True)
class ApprovalHooks:
    """How a front end takes part while a call waits (both optional)."""

    prompt: Prompter | None = None
    announce: Announcer | None = None


def seconds_since(timestamp: str) -> float:
    """Seconds from an audit timestamp (ISO, UTC if naive) until now."""
    moment = datetime.fromisoformat(timestamp)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (datetime.now(UTC) - moment).total_seconds()


def decision_label(record: dict[str, Any]) -> str:
    """``approved``, ``denied`` or ``timeout`` (a denial by the timeout)."""
    if record["status"] == CallStatus.DENIED and record.get("decided_by") == TIMEOUT_DECIDER:
        return "timeout"
    return str(record["status"])


class ApprovalGate:
    """Waits for the decisions on one session's calls (one gate per session, shared by its agents)."""

    def __init__(
        self, audit: AuditStore, session_id: str, timeout_s: float, hooks: ApprovalHooks | None = None
    ) -> None:
        self._audit = audit
        self._session_id = session_id
        self._timeout_s = timeout_s
        self._hooks = hooks or ApprovalHooks()
        self._waiting = 0
        self._prompt_lock: asyncio.Lock | None = None

    async def wait(self, record: dict[str, Any]) -> dict[str, Any]:
        """Wait until the call is decided; return its record (``approved`` or ``denied``).

        Raises AuditError (also SessionTakenOverError) when the audit fails.
        """
        pending = PendingCall.from_record(record)
        tool = pending.tool_name
        audit, session_id = self._audit, self._session_id
        PENDING.labels(tool).inc()
        self._waiting += 1
        prompt_task: asyncio.Task[bool | None] | None = None
        try:
            if self._waiting == 1:
                await audit.set_awaiting_approval(session_id, True)
            left = self._timeout_s - seconds_since(pending.waiting_since)
            if self._hooks.announce is not None:
                self._hooks.announce(pending, max(0.0, left))
            if self._hooks.prompt is not None:
                prompt_task = asyncio.ensure_future(self._ask(pending))
            beat = time.monotonic()
            while True:
                row = await audit.tool_call(session_id, pending.call_id)
                if row["status"] != CallStatus.PENDING_APPROVAL:
                    break
                left = self._timeout_s - seconds_since(pending.waiting_since)
                if prompt_task is not None and prompt_task.done():
                    answer, prompt_task = prompt_task.result(), None
                    if answer is not None:
                        reason = "" if answer else "denied at the prompt"
                        await self._decide(pending, answer, reason, os_user())
                        continue
                if left <= 0:
                    reason = f"nobody decided within {self._timeout_s:g} s (session.approval_timeout_s)"
                    await self._decide(pending, False, reason, TIMEOUT_DECIDER)
                    continue
                if time.monotonic() - beat >= HEARTBEAT_S:
                    await audit.set_awaiting_approval(session_id, True)
                    beat = time.monotonic()
                waits: set[asyncio.Task[bool | None]] = {prompt_task} if prompt_task is not None else set()
                if waits:
                    await asyncio.wait(waits, timeout=min(POLL_S, left))
                else:
                    await asyncio.sleep(min(POLL_S, left))
        finally:
            if prompt_task is not None and not prompt_task.done():
                prompt_task.cancel()
            self._waiting -= 1
            PENDING.labels(tool).dec()
        if self._waiting == 0:
            await audit.set_awaiting_approval(session_id, False)
        label = decision_label(row)
        DECIDED.labels(tool, label).inc()
        if row.get("decided_at"):
            WAITED.labels(tool, label).observe(max(0.0, seconds_since(pending.waiting_since)
                                                   - seconds_since(str(row["decided_at"]))))  # fmt: skip
        return row

    async def _decide(self, pending: PendingCall, approve: bool, reason: str, decided_by: str) -> None:
        with contextlib.suppress(CallNotPendingError):  # someone decided first: the next read shows it
            await self._audit.decide(self._session_id, pending.call_id, approve, reason, decided_by)

    async def _ask(self, pending: PendingCall) -> bool | None:
        """Ask in place, one call at a time (calls of one turn can wait together)."""
        assert self._hooks.prompt is not None
        if self._prompt_lock is None:
            self._prompt_lock = asyncio.Lock()
        async with self._prompt_lock:
            return await self._hooks.prompt(pending)
