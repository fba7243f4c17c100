"""Tool calls that wait for approval in heists hosted by `orchestrator serve`, decided over A2A and from the CLI.

Real processes (the mesh, the orchestrator service, a scripted model endpoint
whose mole queries the database once, which the config makes wait for
approval), driven with the a2a-sdk's own client.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from a2a.types import a2a_pb2
from google.protobuf import json_format, struct_pb2

from tests.support.a2a import a2a_client, bearer, heist_request, oauth_token, status_code
from tests.support.config import CREW
from tests.support.processes import ProcessMesh
from tests.support.scripted_llm import Reply, ScriptedLLM, text, tool_call

REPO = Path(__file__).resolve().parents[2]
QUERY = "SELECT name FROM guards LIMIT 1"
TURNS = 4
WAIT_S = 60.0


def mole_queries(body: dict[str, Any]) -> Reply:
    """The mole calls database_query once, then answers its result; everyone else just talks."""
    cue = str(body["messages"][-1].get("content") or "")
    if body["messages"][-1]["role"] == "tool":
        return text("Noted.")
    if "Your turn, mole" in cue and body.get("tools"):
        return tool_call("database_query_query", sql=QUERY)
    return text("Fine.")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessMesh]:
    work = tmp_path_factory.mktemp("a2a_approvals")
    with ScriptedLLM(responder=mole_queries) as llm:
        running = ProcessMesh(
            work,
            llm_base_url=llm.base_url,
            agents=[{**a, "require_approval": ["database_query"]} if a["name"] == "mole" else a for a in CREW],
            session={"max_turns": TURNS, "approval_timeout_s": 300},
            llm={"base_url": llm.base_url, "timeout_s": 30, "max_retries": 0, "tool_calling": "native"},
        )
        try:
            running.start()
            running.start("orchestrator")
            yield running
        finally:
            running.stop()


def decision(task_id: str, **data: Any) -> a2a_pb2.SendMessageRequest:
    value = struct_pb2.Value()
    value.struct_value.update(data)
    parts = [a2a_pb2.Part(data=value)]
    message = a2a_pb2.Message(message_id="d1", task_id=task_id, role=a2a_pb2.ROLE_USER, parts=parts)
    return a2a_pb2.SendMessageRequest(message=message)


def approval_of(status: a2a_pb2.TaskStatus) -> dict[str, Any]:
    [part] = [p for p in status.message.parts if p.WhichOneof("content") == "data"]
    found = json_format.MessageToDict(part.data)
    assert isinstance(found, dict)
    return found


async def waiting_task(mesh: ProcessMesh, token: str) -> tuple[str, list[a2a_pb2.StreamResponse]]:
    """Start a streamed heist; return its id and the stream, which ends at the mole's waiting call."""
    events = []
    async with a2a_client(mesh.config, mesh.address("orchestrator")) as a2a:
        async for event in a2a.send_message(heist_request("Rob the bank.", turns=TURNS), context=bearer(token)):
            events.append(event)
    return events[0].task.id, events


async def test_a_waiting_call_is_input_required_and_approving_it_over_a2a_runs_it(mesh: ProcessMesh) -> None:
    config, address = mesh.config, mesh.address("orchestrator")
    alice, bob = oauth_token(config, "alice"), oauth_token(config, "bob")
    task_id, events = await waiting_task(mesh, alice)
    last = events[-1].status_update.status
    assert last.state == a2a_pb2.TASK_STATE_INPUT_REQUIRED
    call = approval_of(last)
    assert call["call_id"] == "4.1" and call["agent"] == "mole" and call["tool"] == "database_query"
    assert json.loads(call["arguments"]) == {"sql": QUERY} and 0 < call["seconds_left"] <= 300

    async with a2a_client(config, address) as a2a:
        task = await a2a.get_task(a2a_pb2.GetTaskRequest(id=task_id), context=bearer(alice))
        assert task.status.state == a2a_pb2.TASK_STATE_INPUT_REQUIRED and approval_of(task.status)["call_id"] == "4.1"
        refusals = [
            (bob, {"call_id": "4.1", "decision": "approve"}, grpc.StatusCode.NOT_FOUND),
            (alice, {"call_id": "4.1", "decision": "maybe"}, grpc.StatusCode.INVALID_ARGUMENT),
            (alice, {"decision": "approve"}, grpc.StatusCode.INVALID_ARGUMENT),
            (alice, {"call_id": "9.9", "decision": "approve"}, grpc.StatusCode.INVALID_ARGUMENT),
        ]
        for token, data, code in refusals:
            with pytest.raises(Exception) as refused:
                async for _ in a2a.send_message(decision(task_id, **data), context=bearer(token)):
                    pass
            assert status_code(refused.value) == code, data
        after: list[a2a_pb2.StreamResponse] = []
        approve = decision(task_id, call_id="4.1", decision="approve")
        async for event in a2a.send_message(approve, context=bearer(alice)):
            after.append(event)
        states = [e.status_update.status.state for e in after if e.HasField("status_update")]
        assert states[0] == a2a_pb2.TASK_STATE_WORKING and states[-1] == a2a_pb2.TASK_STATE_COMPLETED
        turns = [int(e.status_update.status.message.metadata["turn"]) for e in after
                 if e.HasField("status_update") and "turn" in e.status_update.status.message.metadata]  # fmt: skip
        assert turns == [4], "the turn whose call was approved streams to the call that approved it"
        # Deciding twice: not pending any more, and the message says so.
        with pytest.raises(Exception) as twice:
            async for _ in a2a.send_message(decision(task_id, call_id="4.1", decision="deny"), context=bearer(alice)):
                pass
        assert status_code(twice.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert mesh.rows("SELECT status_code, success FROM tool_usage WHERE session_id = ?", task_id) == [("OK", 1)]
    assert mesh.rows("SELECT decided_by FROM tool_calls WHERE session_id = ?", task_id) == [("alice",)]


async def test_denying_over_a2a_fails_the_call_with_the_reason(mesh: ProcessMesh) -> None:
    alice = oauth_token(mesh.config, "alice")
    task_id, _ = await waiting_task(mesh, alice)
    request = decision(task_id, call_id="4.1", decision="deny", reason="too risky")
    async with a2a_client(mesh.config, mesh.address("orchestrator"), streaming=False) as a2a:
        async for _ in a2a.send_message(request, context=bearer(alice)):
            pass
        deadline = time.monotonic() + WAIT_S
        while (task := await a2a.get_task(a2a_pb2.GetTaskRequest(id=task_id), context=bearer(alice))).status.state \
                != a2a_pb2.TASK_STATE_COMPLETED:  # fmt: skip
            assert time.monotonic() < deadline, task.status
            await asyncio.sleep(0.2)
    [(code, success, reason)] = mesh.rows(
        "SELECT status_code, success, tool_result FROM tool_usage WHERE session_id = ?", task_id
    )
    assert code == "DENIED" and success == 0 and reason.endswith(": too risky")


async def test_the_cli_approves_a_call_of_a_service_hosted_session(mesh: ProcessMesh) -> None:
    alice = oauth_token(mesh.config, "alice")
    run = [str(Path(sys.executable).parent / "orchestrator"), "run", "--turns", str(TURNS), "--config",
           str(mesh.config_path), "--via", mesh.address("orchestrator"), "--client", "alice"]  # fmt: skip
    ran = await asyncio.to_thread(subprocess.run, run, cwd=REPO, capture_output=True, text=True, timeout=60)
    # `run --via` says which call waits and how to decide it (A2A ends the stream at INPUT_REQUIRED).
    assert ran.returncode != 0 and "waits for approval of call 4.1" in ran.stderr and "Traceback" not in ran.stderr
    task_id = ran.stderr.split("orchestrator approve ")[1].split()[0]
    command = [str(Path(sys.executable).parent / "orchestrator"), "approve", task_id, "4.1",
               "--config", str(mesh.config_path)]  # fmt: skip
    done = await asyncio.to_thread(subprocess.run, command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    async with a2a_client(mesh.config, mesh.address("orchestrator"), streaming=False) as a2a:
        deadline = time.monotonic() + WAIT_S
        while (task := await a2a.get_task(a2a_pb2.GetTaskRequest(id=task_id), context=bearer(alice))).status.state \
                != a2a_pb2.TASK_STATE_COMPLETED:  # fmt: skip
            assert time.monotonic() < deadline, task.status
            await asyncio.sleep(0.05)
    assert mesh.rows("SELECT status_code FROM tool_usage WHERE session_id = ?", task_id) == [("OK",)]
    assert mesh.rows("SELECT status FROM sessions WHERE session_id = ?", task_id) == [("completed",)]
