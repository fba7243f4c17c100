"""Heists hosted by ``orchestrator serve``: one set of shared resources, many sessions, limits, cancel, recovery.

``SessionHost`` opens the audit, the mesh's channels and the LLM client once
(``SessionResources``) and runs every session on them. ``HeistExecutor`` is
the A2A SDK's ``AgentExecutor``: it turns a SendMessage into a session (task
id = session id), streams one status update per completed turn, and ends the
task as the session ended. Starting counts against the limits before the SDK
sees the request (``Reservation``), so a burst cannot overshoot them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.tasks import TaskUpdater
from a2a.types import a2a_pb2
from google.protobuf import json_format

from heist_common.audit import AuditStore, CallStatus, EventRow, SessionStatus
from heist_common.audit.approvals import PendingCall, pending_calls
from heist_common.config import HeistConfig
from orchestrator.service.limits import ServiceLimits
from orchestrator.service.tasks import pending_message, turn_message
from orchestrator.session.resume import judge_liveness
from orchestrator.session.runner import SEED_LIMIT, RunOptions, SessionResources, SessionResult, SessionRunner
from orchestrator.turn.approval import ApprovalHooks, seconds_since
from orchestrator.turn.turn import Turn

__all__ = [
    "HeistExecutor",
    "HeistRequest",
    "RequestError",
    "Reservation",
    "SessionHost",
    "parse_decision",
    "parse_request",
]

log = logging.getLogger("heist.orchestrator.service")

DATA_KEYS = frozenset({"turns", "seed"})
DECISION_KEYS = frozenset({"call_id", "decision", "reason"})


class RequestError(ValueError):
    """A SendMessage the service refuses: INVALID_ARGUMENT with this message."""


class LimitError(Exception):
    """Starting one more heist would pass a limit: RESOURCE_EXHAUSTED with this message."""


@dataclass(frozen=True)
class HeistRequest:
    """What a SendMessage asks for."""

    objective: str | None
    turns: int | None
    seed: int | None


def _whole(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise RequestError(f"data part: {name!r} must be a whole number, not {value!r}")
    number = int(value)
    if not low <= number <= high:
        raise RequestError(f"data part: {name!r} must be {low}..{high}, not {number}")
    return number


def parse_request(message: a2a_pb2.Message, config: HeistConfig, limits: ServiceLimits) -> HeistRequest:
    """Read the objective (text parts) and ``turns``/``seed`` (a data part); RequestError says what is wrong."""
    if message.task_id:
        raise RequestError("a heist is started by one message: leave task_id empty (each SendMessage is a new heist)")
    texts: list[str] = []
    data: dict[str, Any] = {}
    for part in message.parts:
        kind = part.WhichOneof("content")
        if kind == "text":
            texts.append(part.text)
        elif kind == "data":
            value = json_format.MessageToDict(part.data)
            if not isinstance(value, dict):
                raise RequestError('the data part must be an object such as {"turns": 8, "seed": 7}')
            unknown = sorted(set(value) - DATA_KEYS)
            if unknown:
                raise RequestError(f"data part: unknown key(s) {', '.join(unknown)} (known: turns, seed)")
            data.update(value)
        else:
            raise RequestError(f"unsupported part {kind!r}: send the objective as text, turns and seed as data")
    objective = "\n".join(texts).strip()
    if len(objective) > limits.max_objective_chars:
        raise RequestError(
            f"the objective has {len(objective)} characters; the limit is {limits.max_objective_chars} "
            "(services.orchestrator.limits.max_objective_chars)"
        )
    most = min(limits.max_turns, config.session.max_turns_allowed)
    turns = _whole(data["turns"], "turns", 1, most) if "turns" in data else None
    seed = _whole(data["seed"], "seed", 0, SEED_LIMIT - 1) if "seed" in data else None
    return HeistRequest(objective or None, turns, seed)


def parse_decision(message: a2a_pb2.Message) -> tuple[str, Literal["approve", "deny"], str]:
    """Read a decision on a waiting call (a message on the task): call id, approve or deny, reason."""
    data: dict[str, Any] | None = None
    for part in message.parts:
        if part.WhichOneof("content") == "data":
            value = json_format.MessageToDict(part.data)
            if not isinstance(value, dict) or data is not None:
                raise RequestError('a message on a task decides a waiting call: one data part such as '
                                   '{"call_id": "...", "decision": "approve"}')  # fmt: skip
            data = value
    if data is None:
        raise RequestError('a message on a task decides a waiting call: send a data part such as '
                           '{"call_id": "...", "decision": "approve"|"deny", "reason": "..."}')  # fmt: skip
    unknown = sorted(set(data) - DECISION_KEYS)
    if unknown:
        raise RequestError(f"data part: unknown key(s) {', '.join(unknown)} (known: call_id, decision, reason)")
    call_id, decision, reason = data.get("call_id"), data.get("decision"), data.get("reason", "")
    if not isinstance(call_id, str) or not call_id:
        raise RequestError("data part: 'call_id' is missing (the pending call's id, from the task's status message)")
    if decision not in ("approve", "deny"):
        raise RequestError(f"data part: 'decision' must be 'approve' or 'deny', not {decision!r}")
    if not isinstance(reason, str):
        raise RequestError("data part: 'reason' must be text")
    return call_id, decision, reason


@dataclass
class Reservation:
    """One heist being started: counted against the limits from the check until it runs or the call fails."""

    client: str
    request: HeistRequest
    claimed: bool = False


RESERVATION: contextvars.ContextVar[Reservation | None] = contextvars.ContextVar("heist_reservation", default=None)
"""Set by the gRPC handler around the SDK's call; the executor's task inherits it and claims it."""


Waiting = tuple[PendingCall, float]
"""A call that started waiting for a decision, and the seconds left before its timeout."""


@dataclass
class Hosted:
    """A heist running in this process."""

    runner: SessionRunner
    task: asyncio.Task[SessionResult]
    client: str
    listener: asyncio.Queue[Turn | Waiting] = field(default_factory=asyncio.Queue)
    """Where its turns and waiting calls go: the A2A call streaming it, or a buffer until one attaches.

    Bounded by the session's turns (and its calls that wait); a waiting call
    found there is checked against the audit before it is shown.
    """

    def tell(self, event: Turn | Waiting) -> None:
        """Pass a turn or a waiting call to whoever streams the heist now (or the next to attach)."""
        self.listener.put_nowait(event)


class SessionHost:
    """The sessions of one ``orchestrator serve`` process and what they share."""

    def __init__(self, config: HeistConfig, limits: ServiceLimits) -> None:
        self.config = config
        self.limits = limits
        self._resources: SessionResources | None = None
        self.running: dict[str, Hosted] = {}
        self._pending: Counter[str] = Counter()
        self._by_client: Counter[str] = Counter()
        self.recovered: list[str] = []

    @property
    def resources(self) -> SessionResources:
        """The shared resources; RuntimeError before ``open``."""
        if self._resources is None:
            raise RuntimeError("the session host is not open")
        return self._resources

    @property
    def audit(self) -> AuditStore:
        """The audit store every hosted session writes to."""
        return self.resources.audit

    async def open(self) -> None:
        """Open the shared resources; mark the sessions a killed predecessor was running resumable."""
        self._resources = await SessionResources.open(self.config)
        # Load the model's SDK now (most of a second), not in the first heist's first turn.
        _ = self._resources.llm.client
        self.recovered = await self._recover()

    async def _recover(self) -> list[str]:
        """Sessions started through a service whose process is gone: ``interrupted``, for ``orchestrator resume``.

        Why not resume them here: their callers' streams died with the old
        process; a resume is the caller's (or an operator's) decision, and
        ``orchestrator resume`` does it from the audit alone.
        """
        audit = self.audit
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(None, audit.read_sessions)
        recovered = []
        stale_after_s = self.config.session.stale_after_s
        for row in rows:
            if row["status"] != SessionStatus.ACTIVE or row.get("client_id") is None or row.get("pid") is None:
                continue
            verdict = judge_liveness(row, host=audit.host, stale_after_s=stale_after_s)
            if verdict.live:
                continue
            session_id = str(row["session_id"])
            reason = f"the service running it stopped ({verdict.reason}); resumable: orchestrator resume {session_id}"
            event = EventRow("orchestrator", "recover", "INTERRUPTED", reason)
            now = datetime.now(UTC).isoformat(timespec="milliseconds")
            owner = (int(row["pid"]), str(row["host"]))
            if await audit.settle_session(session_id, SessionStatus.INTERRUPTED, reason, now, owner, event):
                recovered.append(session_id)
                log.warning("session %s: %s", session_id, reason)
        return recovered

    async def close(self) -> None:
        """Interrupt the running heists (each ends ``interrupted``, resumable) and close the shared resources."""
        tasks = [hosted.task for hosted in self.running.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if self._resources is not None:
            await self._resources.close()
            self._resources = None

    def reserve(self, client: str, request: HeistRequest) -> Reservation:
        """Count a heist about to start; LimitError if it would pass a limit."""
        total = len(self.running) + sum(self._pending.values())
        if total >= self.limits.max_sessions:
            raise LimitError(
                f"the service runs {total} heists, its limit (services.orchestrator.limits.max_sessions = "
                f"{self.limits.max_sessions}); retry when one has ended"
            )
        mine = self._by_client[client] + self._pending[client]
        if mine >= self.limits.max_sessions_per_client:
            raise LimitError(
                f"client {client!r} runs {mine} heists, its limit (services.orchestrator.limits."
                f"max_sessions_per_client = {self.limits.max_sessions_per_client}); retry when one has ended"
            )
        self._pending[client] += 1
        return Reservation(client, request)

    def release(self, reservation: Reservation) -> None:
        """Give back a reservation no session claimed (the call failed before the heist started)."""
        if not reservation.claimed:
            reservation.claimed = True
            self._pending[reservation.client] -= 1

    def _claim(self, reservation: Reservation, session_id: str, hosted: Hosted) -> None:
        if not reservation.claimed:
            reservation.claimed = True
            self._pending[reservation.client] -= 1
        self.running[session_id] = hosted
        self._by_client[hosted.client] += 1

    def _ended(self, session_id: str) -> None:
        hosted = self.running.pop(session_id, None)
        if hosted is not None:
            self._by_client[hosted.client] -= 1

    async def start(self, reservation: Reservation, session_id: str) -> Hosted:
        """Record the reserved heist as session ``session_id``, then play it in the background; AuditError if not.

        Its turns and waiting calls go to ``Hosted.listener``: the A2A call that
        streams the heist changes when a decision (a SendMessage) re-attaches to it.
        """
        request = reservation.request
        config = self.config
        if request.objective is not None:
            config = config.with_overrides(session=config.session.model_copy(update={"objective": request.objective}))
        options = RunOptions(session_id=session_id, turns=request.turns, seed=request.seed, export=self.limits.export)
        resources = self.resources
        hosted: Hosted | None = None

        def tell(event: Turn | Waiting) -> None:
            if hosted is not None:
                hosted.tell(event)

        hooks = ApprovalHooks(announce=lambda call, left: tell((call, left)))
        runner = SessionRunner(
            config, resources.clients, resources.llm, resources.audit, options, on_turn=tell,
            approval_hooks=hooks, client_id=reservation.client,
        )  # fmt: skip
        try:
            await runner.record()
        except BaseException:
            self.release(reservation)
            raise
        task = asyncio.ensure_future(runner.run())
        hosted = Hosted(runner, task, reservation.client)
        self._claim(reservation, session_id, hosted)
        task.add_done_callback(lambda _: self._ended(session_id))
        return hosted

    async def cancel(self, session_id: str, by: str) -> bool:
        """Cancel a running heist (it ends ``cancelled``, audited); whether it was running here."""
        hosted = self.running.get(session_id)
        if hosted is None:
            return False
        hosted.runner.cancel(f"cancelled by client {by!r} (A2A CancelTask)")
        hosted.task.cancel()
        await asyncio.wait([hosted.task])
        return True


def _summary(result: SessionResult) -> a2a_pb2.Message:
    text = f"{result.status}: {len(result.turns)} turns, {result.tool_calls_ok} tool calls ok, "
    text += f"{result.tool_calls_failed} failed"
    if result.error:
        text += f": {result.error}"
    summary: dict[str, Any] = {
        "status": result.status, "exit_code": int(result.exit_code), "turns": len(result.turns),
        "tool_calls_ok": result.tool_calls_ok, "tool_calls_failed": result.tool_calls_failed,
        "errors": result.errors, "error": result.error or "", "exports": [str(path) for path in result.exports],
        "report": str(result.report or ""), "database": result.database, "turns_before": result.turns_before,
        "unusable": [
            {"service": u.service, "attempts": u.attempts, "code": u.code, "detail": u.detail} for u in result.unusable
        ],
    }  # fmt: skip
    data = a2a_pb2.Part()
    data.metadata.update({"kind": "summary"})
    data.data.struct_value.update(summary)
    return a2a_pb2.Message(
        message_id=f"{result.session_id}-summary", context_id=result.session_id, task_id=result.session_id,
        role=a2a_pb2.ROLE_AGENT, parts=[a2a_pb2.Part(text=text), data],
    )  # fmt: skip


class HeistExecutor(AgentExecutor):
    """The A2A SDK's executor for heists (module docstring)."""

    def __init__(self, host: SessionHost) -> None:
        self.host = host

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        """Start a heist, or re-attach to one after a decision; stream it until a call waits or it ends.

        A waiting call ends this stream with INPUT_REQUIRED (A2A's interrupted
        state); the session itself waits on in the background, and the SendMessage
        that decides (already decided by the gRPC handler) streams it on from here.
        """
        task_id = str(context.task_id)
        context_id = task_id  # a heist's context is its session, as tasks read from the audit have it
        updater = TaskUpdater(event_queue, task_id, context_id)
        if context.current_task is not None:
            await self._follow(task_id, updater)
            return
        reservation = RESERVATION.get()
        if reservation is None or reservation.claimed:  # only the service's own handler starts heists
            raise RuntimeError("a heist must be started through the service's SendMessage")
        hosted = await self.host.start(reservation, task_id)  # in the audit before it is announced
        first = a2a_pb2.Task(
            id=task_id, context_id=context_id, status=a2a_pb2.TaskStatus(state=a2a_pb2.TASK_STATE_SUBMITTED)
        )
        if context.message is not None:
            first.history.append(context.message)
        await event_queue.enqueue_event(first)
        await updater.start_work()
        await self._stream(hosted, task_id, updater)

    async def _follow(self, task_id: str, updater: TaskUpdater) -> None:
        """After a decision: WORKING again, then the heist's stream (if it still runs in this process)."""
        hosted = self.host.running.get(task_id)
        if hosted is None:  # not running here (a restarted service): the decision waits for ``resume``
            await updater.update_status(a2a_pb2.TASK_STATE_WORKING)
            return
        await updater.start_work()
        # Another call of the same turn may wait too (its announcement went to the stream that ended).
        waiting = await pending_calls(self.host.audit, task_id)
        if waiting:
            await updater.update_status(a2a_pb2.TASK_STATE_INPUT_REQUIRED, self._pending(waiting[0]))
            return
        await self._stream(hosted, task_id, updater)

    def _pending(self, call: PendingCall) -> a2a_pb2.Message:
        left = self.host.config.session.approval_timeout_s - seconds_since(call.waiting_since)
        return pending_message(call, max(0.0, left))

    async def _still_waits(self, task_id: str, call: PendingCall) -> bool:
        with contextlib.suppress(LookupError):
            row = await self.host.audit.tool_call(task_id, call.call_id)
            return bool(row["status"] == CallStatus.PENDING_APPROVAL)
        return False

    async def _stream(self, hosted: Hosted, task_id: str, updater: TaskUpdater) -> None:
        listener: asyncio.Queue[Turn | Waiting] = asyncio.Queue()
        while not hosted.listener.empty():  # what happened while nobody listened
            listener.put_nowait(hosted.listener.get_nowait())
        hosted.listener = listener
        ending = asyncio.ensure_future(asyncio.shield(hosted.task))
        try:
            while True:
                getting = asyncio.ensure_future(listener.get())
                either: set[asyncio.Future[Any]] = {getting, ending}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():
                    getting.cancel()
                    break
                event = getting.result()
                if isinstance(event, Turn):
                    await updater.update_status(a2a_pb2.TASK_STATE_WORKING, turn_message(task_id, event))
                elif await self._still_waits(task_id, event[0]):
                    await updater.update_status(a2a_pb2.TASK_STATE_INPUT_REQUIRED, pending_message(*event))
                    ending.cancel()  # the shield only: the session waits on
                    return
        except asyncio.CancelledError:
            ending.cancel()
            if not hosted.task.done():  # the SDK cancelled this call, not the session: stop the session too
                hosted.task.cancel()
            raise
        finally:
            if hosted.listener is listener:  # buffer for the next call that attaches
                hosted.listener = asyncio.Queue()
                while not listener.empty():
                    hosted.listener.put_nowait(listener.get_nowait())
        while not hosted.listener.empty():  # the last turn, told just before the session ended
            event = hosted.listener.get_nowait()
            if isinstance(event, Turn):
                await updater.update_status(a2a_pb2.TASK_STATE_WORKING, turn_message(task_id, event))
        result = ending.result()
        if result.status in (SessionStatus.COMPLETED, SessionStatus.DEGRADED):
            await updater.complete(_summary(result))
        else:
            await updater.failed(_summary(result))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        """Stop the heist (audited ``cancelled``), then end the task CANCELED."""
        task_id = str(context.task_id)
        by = context.call_context.user.user_name if context.call_context is not None else ""
        await self.host.cancel(task_id, by)
        with contextlib.suppress(RuntimeError):  # already ended meanwhile
            await TaskUpdater(event_queue, task_id, str(context.context_id or task_id)).cancel()
