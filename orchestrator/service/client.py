"""The CLI's side of ``orchestrator serve``: ``run --via`` and ``watch`` with the a2a-sdk's client over gRPC.

A turn streamed by the service is rebuilt into the same ``Turn`` the
in-process run prints, and the final summary into a ``SessionResult``, so
``orchestrator run --via`` prints exactly what ``orchestrator run`` does.
``watch`` follows a session through the service (SubscribeToTask) or, when
no service answers for it, by polling the audit database.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from a2a.client import ClientCallContext, ClientConfig, ClientFactory
from a2a.client.client import Client
from a2a.types import a2a_pb2
from google.protobuf import struct_pb2

from heist_common import tls
from heist_common.audit import AuditStore, EventRow, SessionStatus, ToolUsageRow, UnknownSessionError
from heist_common.config import ORCHESTRATOR_SERVICE, HeistConfig
from heist_common.contract import READ_SCOPE, RUN_SCOPE
from orchestrator.mesh.clients import ServiceCallError, ServiceClients
from orchestrator.service.tasks import TERMINAL, message_fields
from orchestrator.session.runner import SessionResult, UnusableService
from orchestrator.turn.turn import Turn

__all__ = [
    "ServiceError",
    "follow_audit",
    "follow_service",
    "submit",
    "turn_from_message",
    "turns_from_log",
]

TurnPrinter = Callable[[Turn], None]
POLL_S = 0.5
"""How often ``watch`` reads the audit when no service streams the session."""
CALL_TIMEOUT_S = 10.0
"""Deadline of the unary calls (a stream has none: a heist takes as long as it takes)."""


class ServiceError(Exception):
    """The service refused or could not be reached; ``code`` is its gRPC status (None: no answer at all)."""

    def __init__(self, message: str, code: grpc.StatusCode | None) -> None:
        super().__init__(message)
        self.code = code


def _status_of(error: BaseException) -> tuple[grpc.StatusCode | None, str]:
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, grpc.aio.AioRpcError):
            return cause.code(), cause.details() or ""
        cause = cause.__cause__
    return None, str(error)


def turn_from_message(message: a2a_pb2.Message) -> Turn | None:
    """Rebuild the ``Turn`` a turn update describes (None if the message is not a turn)."""
    if "turn" not in message.metadata.fields:
        return None
    meta = message.metadata.fields
    text, data = message_fields(message)
    turn_id = int(meta["turn"].number_value)
    agent = meta["agent"].string_value
    turn = Turn(turn_id, agent, meta["role"].string_value, message=text, status=meta["status"].string_value or "ok")
    for item in data:
        if item["kind"] == "tool_call":
            turn.tool_usage.append(
                ToolUsageRow(turn_id, agent, str(item.get("tool", "")), str(item.get("operation", "")),
                             str(item.get("arguments", "")), str(item.get("result", "")), bool(item.get("success")),
                             str(item.get("code", "")) or None)
            )  # fmt: skip
        elif item["kind"] == "error":
            turn.events.append(
                EventRow(str(item.get("service", "")), str(item.get("operation", "")), str(item.get("code", "")),
                         str(item.get("detail", "")), turn_id=turn_id, agent_name=agent)
            )  # fmt: skip
    return turn


def _result(session_id: str, summary: dict[str, Any], turns: list[Turn]) -> SessionResult:
    result = SessionResult(
        session_id, str(summary.get("status", "")), int(summary.get("exit_code", 1)), turns=turns,
        database=str(summary.get("database", "")), error=str(summary.get("error", "")) or None,
    )  # fmt: skip
    result.exports = [Path(path) for path in summary.get("exports", [])]
    result.report = Path(summary["report"]) if summary.get("report") else None
    result.unusable = [
        UnusableService(str(u["service"]), int(u["attempts"]), str(u["code"]), str(u.get("detail", "")))
        for u in summary.get("unusable", [])
    ]
    return result


async def _token(config: HeistConfig, client_id: str, scopes: list[str]) -> str:
    """Get a token from the mesh's OAuthService; ServiceError (one line) if it cannot be had."""
    clients = ServiceClients(config)
    try:
        return await clients.tokens.token(client_id, scopes, ())
    except ServiceCallError as exc:
        raise ServiceError(f"no token for client {client_id!r}: {exc}", None) from None
    finally:
        await clients.close()


def _client(config: HeistConfig, address: str, *, streaming: bool = True) -> Client:
    card = a2a_pb2.AgentCard(
        name="heist-crew",
        supported_interfaces=[a2a_pb2.AgentInterface(url=address, protocol_binding="GRPC", protocol_version="1.0")],
        capabilities=a2a_pb2.AgentCapabilities(streaming=True),
    )

    def channel(url: str) -> grpc.aio.Channel:
        return tls.aio_channel(config, url, service=ORCHESTRATOR_SERVICE, identity="orchestrator")

    factory = ClientFactory(
        ClientConfig(streaming=streaming, grpc_channel_factory=channel, supported_protocol_bindings=["GRPC"])
    )
    return factory.create(card)


def service_address(config: HeistConfig, address: str | None) -> str | None:
    """``--via`` if given, else the configured orchestrator service's address (None if there is none)."""
    if address:
        return address
    return config.services[ORCHESTRATOR_SERVICE].address if ORCHESTRATOR_SERVICE in config.services else None


def _waiting_text(task_id: str, status: a2a_pb2.TaskStatus) -> str:
    """Say which call the session waits for, and how to decide it (A2A ends a stream at INPUT_REQUIRED)."""
    call = next((item for item in message_fields(status.message)[1] if item["kind"] == "approval"), {})
    call_id = call.get("call_id", "CALL_ID")
    return (
        f"{task_id} waits for approval of call {call_id} ({call.get('agent', '?')}: {call.get('tool', '?')}); "
        f"decide with: orchestrator approve {task_id} {call_id} (or deny --reason TEXT)"
    )


async def _events(
    stream: AsyncIterator[a2a_pb2.StreamResponse], on_turn: TurnPrinter, seen: set[int]
) -> tuple[str, a2a_pb2.TaskStatus | None, a2a_pb2.TaskStatus | None]:
    """Print each new turn; return the task id, its final status and the status asking for a decision (or None)."""
    task_id, final, waiting = "", None, None
    async for event in stream:
        if event.HasField("task"):
            task_id = event.task.id
            # A snapshot: earlier turns moved to the history, the latest is still the status message.
            for message in [*event.task.history, event.task.status.message]:
                _print_new(message, on_turn, seen)
            if event.task.status.state in TERMINAL:
                final = event.task.status
        elif event.HasField("status_update"):
            task_id = task_id or event.status_update.task_id
            _print_new(event.status_update.status.message, on_turn, seen)
            if event.status_update.status.state in TERMINAL:
                final = event.status_update.status
            elif event.status_update.status.state == a2a_pb2.TASK_STATE_INPUT_REQUIRED:
                waiting = event.status_update.status
    return task_id, final, waiting


def _print_new(message: a2a_pb2.Message, on_turn: TurnPrinter, seen: set[int]) -> None:
    turn = turn_from_message(message)
    if turn is not None and turn.turn_id not in seen:
        seen.add(turn.turn_id)
        on_turn(turn)


async def submit(
    config: HeistConfig, address: str, client_id: str, *, objective: str, turns: int | None, seed: int | None,
    on_turn: TurnPrinter,
) -> SessionResult:  # fmt: skip
    """Start a heist on the service and stream it to its end; ServiceError if the service refuses or is gone."""
    token = await _token(config, client_id, [RUN_SCOPE, READ_SCOPE])
    parts = [a2a_pb2.Part(text=objective)]
    data = {key: value for key, value in {"turns": turns, "seed": seed}.items() if value is not None}
    if data:
        value = struct_pb2.Value()
        value.struct_value.update(data)
        parts.append(a2a_pb2.Part(data=value))
    request = a2a_pb2.SendMessageRequest(
        message=a2a_pb2.Message(message_id=f"cli-{time.time_ns()}", role=a2a_pb2.ROLE_USER, parts=parts)
    )
    context = ClientCallContext(service_parameters={"authorization": f"Bearer {token}"})
    collected: list[Turn] = []

    def keep(turn: Turn) -> None:
        collected.append(turn)
        on_turn(turn)

    try:
        async with _client(config, address) as client:
            task_id, final, waiting = await _events(client.send_message(request, context=context), keep, set())
    except Exception as exc:  # the SDK wraps every transport failure; its gRPC status says which
        code, detail = _status_of(exc)
        status = code.name if code else "error"
        raise ServiceError(f"the orchestrator service at {address}: {status}: {detail}", code) from None
    if final is None and waiting is not None:
        raise ServiceError(_waiting_text(task_id, waiting), None)
    if final is None:
        raise ServiceError(f"the orchestrator service at {address} ended the stream of {task_id} early", None)
    summary = next((item for item in message_fields(final.message)[1] if item["kind"] == "summary"), {})
    if not summary:
        state = a2a_pb2.TaskState.Name(final.state)
        summary = {"status": state.removeprefix("TASK_STATE_").lower(), "exit_code": 1,
                   "error": message_fields(final.message)[0]}  # fmt: skip
    return _result(task_id, summary, collected)


async def follow_service(
    config: HeistConfig, address: str, client_id: str, session_id: str, on_turn: TurnPrinter
) -> str:
    """Follow a running session through the service (SubscribeToTask); its final state's name. ServiceError if not."""
    token = await _token(config, client_id, [READ_SCOPE])
    context = ClientCallContext(service_parameters={"authorization": f"Bearer {token}"})
    try:
        async with _client(config, address) as client:
            stream = client.subscribe(a2a_pb2.SubscribeToTaskRequest(id=session_id), context=context)
            _, final, waiting = await _events(stream, on_turn, set())
    except Exception as exc:  # the SDK wraps every transport failure; its gRPC status says which
        code, detail = _status_of(exc)
        raise ServiceError(f"{code.name if code else 'error'}: {detail}", code) from None
    if final is None and waiting is not None:
        raise ServiceError(_waiting_text(session_id, waiting), None)
    if final is None:
        raise ServiceError("the stream ended before the session did", None)
    return message_fields(final.message)[0] or a2a_pb2.TaskState.Name(final.state)


def turns_from_log(log: dict[str, Any]) -> list[Turn]:
    """Rebuild the turns of a session as the audit has them (``AuditStore.read_session_log``)."""
    turns = {}
    for row in log["messages"]:
        turn = Turn(int(row["turn_id"]), str(row["agent_name"]), str(row["agent_role"]), message=str(row["message"]),
                    status=str(row.get("status") or "ok"))  # fmt: skip
        turns[turn.turn_id] = turn
    for usage in log["tool_usage"]:
        found = turns.get(int(usage["turn_id"]))
        if found is not None:
            found.tool_usage.append(
                ToolUsageRow(found.turn_id, found.agent_name, str(usage["tool_name"]),
                             str(usage.get("operation") or ""), str(usage["tool_params"]), str(usage["tool_result"]),
                             bool(usage["success"]), usage.get("status_code"))
            )  # fmt: skip
    for event in log["events"]:
        found = turns.get(int(event["turn_id"])) if event.get("turn_id") is not None else None
        if found is not None and event["status_code"] != "OK":
            found.events.append(EventRow(str(event["service"]), str(event["operation"]), str(event["status_code"]),
                                         str(event["detail"]), turn_id=found.turn_id))  # fmt: skip
    return [turns[key] for key in sorted(turns)]


async def follow_audit(
    audit: AuditStore, session_id: str, on_turn: TurnPrinter, *, stale_after_s: float
) -> str:
    """Print the session's turns as the audit gets them, until it ends; its status line. UnknownSessionError if none.

    Bounded: a session that stays ``active`` with no new turn for ``stale_after_s`` is reported as stale.
    """
    loop = asyncio.get_running_loop()
    seen: set[int] = set()
    last_change = time.monotonic()
    while True:
        log = await loop.run_in_executor(None, audit.read_session_log, session_id)
        for turn in turns_from_log(log):
            if turn.turn_id not in seen:
                seen.add(turn.turn_id)
                last_change = time.monotonic()
                on_turn(turn)
        row = log["session"]
        if row["status"] != SessionStatus.ACTIVE:
            return f"{row['status']}" + (f": {row['error']}" if row.get("error") else "")
        if time.monotonic() - last_change > stale_after_s:
            return f"active, but no turn for {stale_after_s:g} s (session.stale_after_s): its process may be gone"
        await asyncio.sleep(POLL_S)


__all__ += ["UnknownSessionError", "service_address"]
