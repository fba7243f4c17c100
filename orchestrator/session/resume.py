"""Resuming a session from the audit alone: when it may be resumed, and where it picks up.

The audit is the single source of truth, so it is all a resume needs: the
conversation (every committed turn), the turn strategy, its seed and the number
of turns planned (recorded when the session started). A turn is one
transaction, so a killed process leaves whole turns only; the resume replays
none of them and continues with the next turn number.

**The stale rule.** A session ``interrupted`` or ``failed`` can always be
resumed, a ``completed`` or ``degraded`` one never: both played every planned
turn, so a resume would play none (a ``degraded`` session's crew could not use
a service; once it works, run a new session). An ``active`` one is still
running unless it is stale, which is the case when either

1. it is owned by a process on this machine (``sessions.host`` is this host
   name) and that process (``sessions.pid``) no longer exists or is a zombie:
   ``kill -9`` and crashes are recognised at once; or
2. it showed no sign of life for ``session.stale_after_s`` (default 600 s): no
   start, committed turn or resume since ``sessions.heartbeat_at``. This covers
   another machine, and a process that hangs on this one.

Misjudging is safe: a resume takes the session over with a compare-and-set on
its row, and every write of the old process is fenced on ``pid``/``host``
(``AuditStore``), so an old process that was only slow stops at its next turn
with "session ... was resumed" instead of duplicating it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

from heist_common.audit import RUNNING_STATUSES, AuditStore, SessionStatus
from heist_common.config import HeistConfig
from orchestrator.session.schedule import turn_schedule
from orchestrator.turn.prompts import ConversationMessage

__all__ = [
    "NotResumableError",
    "ResumeConflictError",
    "ResumePoint",
    "Verdict",
    "judge_liveness",
    "pid_alive",
    "plan_resume",
    "prepare_resume",
]

REPLAYABLE_STRATEGIES = ("round_robin", "random")


class NotResumableError(Exception):
    """The session is completed, still running, or cannot be continued faithfully (one line for the user)."""


class ResumeConflictError(Exception):
    """The config no longer produces the session's schedule (its crew or turn order changed)."""


@dataclass(frozen=True)
class Verdict:
    """Whether an ``active`` session still has a live owner, and why (for the error message)."""

    live: bool
    reason: str


@dataclass(frozen=True)
class ResumePoint:
    """Where a session picks up: its recorded plan and the conversation so far."""

    session_id: str
    strategy: str
    seed: int | None
    turns_planned: int
    history: tuple[ConversationMessage, ...]
    previous_status: str
    previous_error: str | None
    stale_reason: str | None = None
    answered_before: int = 0
    """Earlier turns the model answered (status ``ok``): a resumed session in which it spoke is not a dud."""
    objective: str | None = None
    """The objective it was played with (None: recorded before objectives were kept; the config's then)."""

    @property
    def turns_done(self) -> int:
        """Turns already in the audit; the next one is ``turns_done + 1``."""
        return len(self.history)

    def describe(self) -> str:
        """One line for the audit event and the CLI."""
        was = self.previous_status if self.stale_reason is None else f"active but stale: {self.stale_reason}"
        if self.previous_error:
            was += f"; its error: {self.previous_error}"
        return f"resumed after turn {self.turns_done} of {self.turns_planned} (was {was})"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine and is not a zombie (killed, not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, it is another user's
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # without /proc (not Linux) os.kill's answer stands; with it, the process just exited
        return not Path("/proc").is_dir()
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _age_s(timestamp: str | None, now: datetime) -> float | None:
    if not timestamp:
        return None
    try:
        moment = datetime.fromisoformat(timestamp)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (now - moment).total_seconds()


def judge_liveness(
    row: dict[str, Any],
    *,
    host: str,
    stale_after_s: float,
    now: datetime | None = None,
    alive: Callable[[int], bool] = pid_alive,
) -> Verdict:
    """Apply the stale rule (module docstring) to an ``active`` session's row."""
    now = now or datetime.now(UTC)
    pid, owner_host = row.get("pid"), row.get("host")
    if owner_host == host and pid is not None and not alive(int(pid)):
        return Verdict(False, f"its process {pid} on {host} is gone")
    age = _age_s(row.get("heartbeat_at") or row.get("start_time"), now)
    if age is not None and age > stale_after_s:
        return Verdict(False, f"no sign of life for {age:.0f} s (session.stale_after_s = {stale_after_s:g})")
    owner = f"pid {pid} on {owner_host}" if pid is not None else "an unknown process"
    since = f", last sign of life {age:.0f} s ago" if age is not None else ""
    return Verdict(True, f"{owner}{since}")


def plan_resume(
    row: dict[str, Any],
    messages: Sequence[tuple[int, str, str, str, str]],
    config: HeistConfig,
    *,
    host: str,
    now: datetime | None = None,
    alive: Callable[[int], bool] = pid_alive,
) -> ResumePoint:
    """Decide whether and where the session resumes; NotResumableError or ResumeConflictError if not."""
    session_id, status = str(row["session_id"]), str(row["status"])
    stale_reason: str | None = None
    if status == SessionStatus.COMPLETED:
        raise NotResumableError(f"session {session_id} is completed: nothing to resume")
    if status == SessionStatus.DEGRADED:
        raise NotResumableError(
            f"session {session_id} is degraded: it played every turn, but a service never worked "
            f"({row.get('error') or 'see its events'}); nothing to resume: run a new session once the service works"
        )
    if status in RUNNING_STATUSES:  # awaiting_approval too: a decision can be given while no process runs
        stale_after_s = config.session.stale_after_s
        verdict = judge_liveness(row, host=host, stale_after_s=stale_after_s, now=now, alive=alive)
        if verdict.live:
            raise NotResumableError(
                f"session {session_id} is still running ({verdict.reason}); it can be resumed once that process "
                f"is gone, or after {stale_after_s:g} s without a turn (session.stale_after_s)"
            )
        stale_reason = verdict.reason
    elif status not in (SessionStatus.INTERRUPTED, SessionStatus.FAILED):
        raise NotResumableError(f"session {session_id} has status {status!r}, which cannot be resumed")

    strategy = str(row.get("strategy") or config.session.strategy)
    if strategy not in REPLAYABLE_STRATEGIES:
        raise NotResumableError(f"session {session_id} used the turn strategy {strategy!r}, which cannot be continued")
    seed = row.get("seed")
    if strategy == "random" and seed is None:
        raise NotResumableError(
            f"session {session_id} used the random strategy without a recorded seed (an older version started it), "
            "so its schedule cannot be continued"
        )
    turn_ids = [turn_id for turn_id, *_ in messages]
    if turn_ids != list(range(1, len(turn_ids) + 1)):
        raise NotResumableError(f"session {session_id} has turns {turn_ids} in the audit, not 1..N: cannot continue")
    turns_planned = int(row.get("turns_planned") or config.session.max_turns)
    recorded = [agent for _, agent, *_ in messages]
    expected = list(islice(turn_schedule(strategy, config.turn_order, max(turns_planned, len(recorded)), seed),
                           len(recorded)))  # fmt: skip
    for turn_id, (said, scheduled) in enumerate(zip(recorded, expected, strict=True), start=1):
        if said != scheduled:
            raise ResumeConflictError(
                f"the config's crew or turn order differs from session {session_id}'s: turn {turn_id} was "
                f"{said}'s, the {strategy} schedule now gives it to {scheduled}"
            )
    history = tuple(ConversationMessage(turn_id, agent, role, text) for turn_id, agent, role, text, _ in messages)
    answered = sum(1 for *_, turn_status in messages if turn_status == "ok")
    return ResumePoint(
        session_id, strategy, None if seed is None else int(seed), turns_planned, history, status,
        row.get("error"), stale_reason, answered, row.get("objective"),
    )  # fmt: skip


async def prepare_resume(audit: AuditStore, config: HeistConfig, session_id: str) -> ResumePoint:
    """Read the session from the audit, judge it, and take it over; raises unless this process now owns it.

    UnknownSessionError if there is no such session, NotResumableError or
    ResumeConflictError as ``plan_resume``, AuditError if the database fails.
    """
    row, messages = await audit.session_state(session_id)
    point = plan_resume(row, messages, config, host=audit.host)
    if not await audit.claim_session(session_id, row):
        raise NotResumableError(f"session {session_id} changed while resuming it (another resume, or it is running)")
    return point
