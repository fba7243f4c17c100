"""A2A tasks read from the audit: the audit stays the single source of truth of what a heist did.

A task is a session (task id = session id). ``AuditTaskStore`` keeps the SDK's
own task object only while the task runs in this process (the SDK needs it to
stream and cancel); everything else, and every task once it ended, is read
from the audit database: status from ``sessions``, history from ``messages``
and ``tool_usage``. Tenancy lives here too: a task belongs to the OAuth client
that started it (``sessions.client_id``), and for anyone else it does not exist.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from a2a.server.context import ServerCallContext
from a2a.server.tasks import TaskStore
from a2a.types import a2a_pb2
from a2a.utils.errors import InvalidParamsError
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from heist_common.audit import AuditStore, CallStatus, SessionStatus
from heist_common.audit.approvals import PendingCall
from orchestrator.turn.turn import Turn

__all__ = [
    "TERMINAL",
    "AuditTaskStore",
    "message_fields",
    "pending_message",
    "task_from_log",
    "task_state",
    "turn_message",
]

MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_OFFSET = 1_000_000

STATES: dict[str, a2a_pb2.TaskState] = {
    SessionStatus.ACTIVE: a2a_pb2.TASK_STATE_WORKING,
    SessionStatus.AWAITING_APPROVAL: a2a_pb2.TASK_STATE_INPUT_REQUIRED,
    SessionStatus.COMPLETED: a2a_pb2.TASK_STATE_COMPLETED,
    SessionStatus.DEGRADED: a2a_pb2.TASK_STATE_COMPLETED,
    SessionStatus.FAILED: a2a_pb2.TASK_STATE_FAILED,
    SessionStatus.INTERRUPTED: a2a_pb2.TASK_STATE_FAILED,
    SessionStatus.CANCELLED: a2a_pb2.TASK_STATE_CANCELED,
}
"""Session status -> A2A state (``degraded`` played every turn: COMPLETED, its status message says why)."""
TERMINAL = frozenset(
    {a2a_pb2.TASK_STATE_COMPLETED, a2a_pb2.TASK_STATE_FAILED, a2a_pb2.TASK_STATE_CANCELED, a2a_pb2.TASK_STATE_REJECTED}
)


def task_state(status: str) -> a2a_pb2.TaskState:
    """Return the A2A state of a session status (an unknown one, from a newer version: WORKING)."""
    return STATES.get(status, a2a_pb2.TASK_STATE_WORKING)


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def _data_part(values: dict[str, Any], kind: str) -> a2a_pb2.Part:
    value = struct_pb2.Value()
    value.struct_value.update(values)
    return a2a_pb2.Part(data=value, metadata=_struct({"kind": kind}))


def _timestamp(text: str | None) -> timestamp_pb2.Timestamp | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _message(
    session_id: str, turn_id: int, agent: str, role: str, text: str, status: str,
    tools: list[dict[str, Any]], problems: list[dict[str, Any]] | None = None,
) -> a2a_pb2.Message:  # fmt: skip
    parts = [a2a_pb2.Part(text=text)]
    parts += [_data_part(tool, "tool_call") for tool in tools]
    parts += [_data_part(problem, "error") for problem in problems or ()]
    return a2a_pb2.Message(
        message_id=f"{session_id}-turn-{turn_id}",
        context_id=session_id,
        task_id=session_id,
        role=a2a_pb2.ROLE_AGENT,
        parts=parts,
        metadata=_struct({"turn": turn_id, "agent": agent, "role": role, "status": status}),
    )


def message_fields(message: a2a_pb2.Message) -> tuple[str, list[dict[str, Any]]]:
    """Read a turn or summary message back: its text, and its data parts as dicts (each with its ``kind``)."""
    text = "".join(part.text for part in message.parts if part.WhichOneof("content") == "text")
    data = []
    for part in message.parts:
        if part.WhichOneof("content") == "data":
            values = json_format.MessageToDict(part.data)
            if isinstance(values, dict):
                kind = part.metadata.fields["kind"].string_value if "kind" in part.metadata.fields else ""
                data.append({**values, "kind": kind})
    return text, data


def turn_message(session_id: str, turn: Turn) -> a2a_pb2.Message:
    """Describe one completed turn as an A2A message: what the agent said, each tool call, each failed call."""
    tools = [
        {"tool": row.tool_name, "operation": row.operation or "", "arguments": row.tool_params,
         "result": row.tool_result, "success": bool(row.success), "code": row.status_code or ""}
        for row in turn.tool_usage
    ]  # fmt: skip
    problems = [
        {"service": event.service, "operation": event.operation, "code": event.status_code, "detail": event.detail}
        for event in turn.events
        if event.status_code != "OK"
    ]
    return _message(
        session_id, turn.turn_id, turn.agent_name, turn.agent_role, turn.message, turn.status, tools, problems
    )


def pending_message(call: PendingCall, seconds_left: float) -> a2a_pb2.Message:
    """Ask for a decision on a waiting call: who calls what, with which arguments, and how to answer."""
    text = (
        f"{call.agent_name} wants to call {call.tool_name}.{call.operation} (call {call.call_id}); approve or deny: "
        'SendMessage on this task with a data part {"call_id": ..., "decision": "approve"|"deny", "reason": ...}'
    )
    details = {**call.as_json(), "seconds_left": round(seconds_left, 1)}
    return a2a_pb2.Message(
        message_id=f"{call.session_id}-approval-{call.call_id}", context_id=call.session_id,
        task_id=call.session_id, role=a2a_pb2.ROLE_AGENT,
        parts=[a2a_pb2.Part(text=text), _data_part(details, "approval")],
        metadata=_struct({"call_id": call.call_id}),
    )  # fmt: skip


def status_text(row: dict[str, Any]) -> str:
    """Say in the task's status message progress, and how and why it ended."""
    status = str(row["status"])
    done, planned = int(row.get("num_turns") or 0), row.get("turns_planned")
    text = f"{status}: {done} of {planned or '?'} turns"
    if status == SessionStatus.INTERRUPTED:
        text += f" (resumable: orchestrator resume {row['session_id']})"
    if row.get("error"):
        text += f": {row['error']}"
    return text


def task_from_log(log: dict[str, Any], history_length: int | None = None) -> a2a_pb2.Task:
    """Build the task of a session as the audit has it (``AuditStore.read_session_log``)."""
    row = log["session"]
    session_id = str(row["session_id"])
    tools_by_turn: dict[int, list[dict[str, Any]]] = {}
    for usage in log["tool_usage"]:
        tools_by_turn.setdefault(int(usage["turn_id"]), []).append(
            {"tool": usage["tool_name"], "operation": usage.get("operation") or "",
             "arguments": usage["tool_params"], "result": usage["tool_result"],
             "success": bool(usage["success"]), "code": usage.get("status_code") or ""}
        )  # fmt: skip
    history = [
        _message(session_id, int(m["turn_id"]), str(m["agent_name"]), str(m["agent_role"]), str(m["message"]),
                 str(m.get("status") or "ok"), tools_by_turn.get(int(m["turn_id"]), []))
        for m in log["messages"]
    ]  # fmt: skip
    if history_length is not None:
        history = history[-history_length:] if history_length else []
    status = a2a_pb2.TaskStatus(
        state=task_state(str(row["status"])),
        message=a2a_pb2.Message(
            message_id=f"{session_id}-status", context_id=session_id, task_id=session_id,
            role=a2a_pb2.ROLE_AGENT, parts=[a2a_pb2.Part(text=status_text(row))],
        ),
    )  # fmt: skip
    stamp = _timestamp(row.get("end_time") or row.get("heartbeat_at") or row.get("start_time"))
    if stamp is not None:
        status.timestamp.CopyFrom(stamp)
    metadata = {
        "status": str(row["status"]), "turns": int(row.get("num_turns") or 0),
        "turns_planned": int(row.get("turns_planned") or 0), "strategy": str(row.get("strategy") or ""),
        "started": str(row.get("start_time") or ""),
    }  # fmt: skip
    return a2a_pb2.Task(
        id=session_id, context_id=session_id, status=status, history=history, metadata=_struct(metadata)
    )


def _owner(context: ServerCallContext) -> str:
    return context.user.user_name


def _page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode()


def _page_offset(token: str) -> int:
    try:
        offset = json.loads(base64.urlsafe_b64decode(token.encode()))["offset"]
    except (ValueError, KeyError, TypeError):
        raise InvalidParamsError(message="invalid page_token (pass one a ListTasks answer gave)") from None
    if not isinstance(offset, int) or not 0 <= offset <= MAX_PAGE_OFFSET:
        raise InvalidParamsError(message="invalid page_token (pass one a ListTasks answer gave)")
    return offset


class AuditTaskStore(TaskStore):
    """The SDK's task store over the audit database (module docstring)."""

    def __init__(self, audit: Callable[[], AuditStore]) -> None:
        self._audit_of = audit
        self._live: dict[str, tuple[str, a2a_pb2.Task]] = {}
        """Tasks running in this process: id -> (owner, the SDK's latest copy)."""

    @property
    def _audit(self) -> AuditStore:
        return self._audit_of()

    async def save(self, task: a2a_pb2.Task, context: ServerCallContext) -> None:
        """Keep the SDK's copy while the task runs; once it ended, the audit has it all."""
        owner = self._live[task.id][0] if task.id in self._live else _owner(context)
        if task.status.state in TERMINAL:
            self._live.pop(task.id, None)
            return
        copy = a2a_pb2.Task()
        copy.CopyFrom(task)
        self._live[task.id] = (owner, copy)

    async def get(self, task_id: str, context: ServerCallContext) -> a2a_pb2.Task | None:
        """Return the caller's task ``task_id``; None (NOT_FOUND) when it is someone else's or does not exist."""
        live = self._live.get(task_id)
        if live is not None and live[1].status.state != a2a_pb2.TASK_STATE_INPUT_REQUIRED:
            return live[1] if live[0] == _owner(context) else None
        # Waiting for a decision, which any front end (``orchestrator approve``) may give: the audit knows best.
        log = await self._read_log(task_id)
        if log is None or log["session"].get("client_id") != _owner(context):
            return None
        task = task_from_log(log)
        if task.status.state in TERMINAL:
            self._live.pop(task_id, None)
        elif task.status.state == a2a_pb2.TASK_STATE_INPUT_REQUIRED:
            audit = self._audit
            rows = await asyncio.get_running_loop().run_in_executor(
                None, lambda: audit.read_tool_calls(task_id, CallStatus.PENDING_APPROVAL)
            )
            for row in rows[:1]:
                call = PendingCall.from_record(row)
                task.status.message.CopyFrom(pending_message(call, 0.0))
                task.status.message.parts[1].data.struct_value.fields.pop("seconds_left", None)
        return task

    async def _read_log(self, task_id: str) -> dict[str, Any] | None:
        from heist_common.audit import UnknownSessionError

        try:
            return await asyncio.get_running_loop().run_in_executor(None, self._audit.read_session_log, task_id)
        except UnknownSessionError:
            return None

    async def list(self, params: a2a_pb2.ListTasksRequest, context: ServerCallContext) -> a2a_pb2.ListTasksResponse:
        """Return the caller's tasks, newest first, a page at a time (from the audit)."""
        page_size = params.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidParamsError(message=f"page_size must be 1..{MAX_PAGE_SIZE}")
        offset = _page_offset(params.page_token) if params.page_token else 0
        statuses = [status for status, state in STATES.items() if state == params.status] if params.status else []
        if params.status and not statuses:
            return a2a_pb2.ListTasksResponse(page_size=page_size, total_size=0)
        rows, total = await asyncio.get_running_loop().run_in_executor(
            None, lambda: self._audit.read_client_sessions(
                _owner(context), limit=page_size, offset=offset, statuses=statuses),
        )  # fmt: skip
        history_length = params.history_length if params.HasField("history_length") else 0
        tasks = []
        for row in rows:
            log = {"session": row, "messages": [], "tool_usage": []}
            if history_length:
                found = await self._read_log(str(row["session_id"]))
                log = found if found is not None else log
            tasks.append(task_from_log(log, history_length))
        following = offset + len(rows)
        return a2a_pb2.ListTasksResponse(
            tasks=tasks, page_size=page_size, total_size=total,
            next_page_token=_page_token(following) if following < total else "",
        )  # fmt: skip

    async def delete(self, task_id: str, context: ServerCallContext) -> None:
        """Forget the live copy only: the audit is never deleted through the API."""
        live = self._live.get(task_id)
        if live is not None and live[0] == _owner(context):
            self._live.pop(task_id, None)
