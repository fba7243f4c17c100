"""Session ends the audit database missed: kept in a file, recorded when the database is back.

When the database is unreachable at the end of a run (PostgreSQL down or
restarting), the session's row would stay ``active`` while the run reported
``failed``. So the runner writes what it could not record to
``<run_dir>/audit/unrecorded/<session>.json`` (the session, the database
without its password, the status, the error, the end time and the owning
pid and host), and the next ``orchestrator run`` or ``orchestrator resume`` on
that database records it before doing anything else, with a ``reconcile``
event saying when and why. Only a row still ``active`` and owned by that
process is changed, so a session resumed in the meantime keeps its own story;
the file is removed once the row no longer waits for it.

The status recorded is ``failed``, as the run's summary and exit code said (its
exports could not be written either); ``orchestrator resume`` continues it,
or, when every planned turn was played, just completes it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from heist_common.audit import AuditError, AuditStore, EventRow, now_iso

log = logging.getLogger("heist.orchestrator")

__all__ = ["UnrecordedEnd", "record_later", "settle_unrecorded", "unrecorded_dir"]


@dataclass(frozen=True)
class UnrecordedEnd:
    """A session end the database did not get, as kept on disk."""

    session_id: str
    database: str
    """``AuditStore.location``: a SQLite file, or the URL without its password."""
    status: str
    error: str
    end_time: str
    pid: int
    host: str


def unrecorded_dir(run_dir: Path) -> Path:
    """Where unrecorded session ends wait for their database."""
    return run_dir / "audit" / "unrecorded"


def record_later(folder: Path, audit: AuditStore, session_id: str, status: str, error: str) -> Path:
    """Keep the session's end in ``folder`` for the next run or resume on this database; return the file.

    Written to a temporary file and renamed, so a reader never sees half of it; OSError if it cannot be written.
    """
    end = UnrecordedEnd(session_id, audit.location, status, error, now_iso(), audit.pid, audit.host)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{session_id}.json"
    partial = path.with_suffix(f".json.{os.getpid()}.tmp")
    partial.write_text(json.dumps(asdict(end), indent=2) + "\n", encoding="utf-8")
    partial.replace(path)
    return path


def _read(path: Path) -> UnrecordedEnd | None:
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
        end = UnrecordedEnd(**fields)
    except (OSError, ValueError, TypeError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None
    return end


async def settle_unrecorded(audit: AuditStore, folder: Path) -> list[str]:
    """Record every kept end that belongs to ``audit``'s database; return the sessions settled.

    A database error leaves the files for next time: settling is a courtesy
    to the audit, never a reason for the run at hand to fail.
    """
    settled: list[str] = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        end = _read(path)
        if end is None or end.database != audit.location:
            continue
        event = EventRow(
            "orchestrator",
            "reconcile",
            "OK",
            f"status {end.status} recorded late, by pid {audit.pid} on {audit.host}: the database was "
            f"unreachable when pid {end.pid} on {end.host} ended the session at {end.end_time}",
        )
        try:
            if await audit.settle_session(end.session_id, end.status, end.error, end.end_time, (end.pid, end.host),
                                          event):  # fmt: skip
                settled.append(end.session_id)
        except AuditError as exc:
            log.warning("session %s: its end is still unrecorded: %s", end.session_id, exc)
            continue
        path.unlink(missing_ok=True)  # recorded now, or the row moved on (resumed, finished) without it
    return settled
