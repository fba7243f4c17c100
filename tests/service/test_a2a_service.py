"""`orchestrator serve` over A2A's gRPC binding, driven by the a2a-sdk's own client against real processes.

The mesh (oauth, memory, the tools), the orchestrator service and a scripted
HTTP model endpoint (``tests.bench.http_llm``) all run as processes on free
ports; tokens come from the real OAuthService.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from a2a.client.client import Client
from a2a.types import a2a_pb2
from prometheus_client.parser import text_string_to_metric_families

from heist_common.config import HeistConfig
from tests.bench.http_llm import HttpLLM
from tests.support.a2a import a2a_client, bearer, heist_request, oauth_token, status_code
from tests.support.processes import ProcessMesh

TURNS = 8


@pytest.fixture(scope="module")
def llm() -> Iterator[HttpLLM]:
    with HttpLLM(delay_ms=100) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, llm: HttpLLM) -> Iterator[ProcessMesh]:
    work = tmp_path_factory.mktemp("a2a")
    running = ProcessMesh(
        work,
        llm_base_url=llm.base_url,
        session={"max_turns": TURNS},
        llm={"base_url": llm.base_url, "timeout_s": 5, "max_retries": 0, "prompt_style": "transcript",
             "tool_calling": "inline", "prefill_tool_every": 1, "constrained_tools": "off"},
        limits={"orchestrator": {"max_sessions_per_client": 3, "max_turns": 20}},
    )
    try:
        running.start()
        running.start("orchestrator")
        yield running
    finally:
        running.stop()


@pytest.fixture
def config(mesh: ProcessMesh) -> HeistConfig:
    return mesh.config


@pytest.fixture
def address(mesh: ProcessMesh) -> str:
    return mesh.address("orchestrator")


def client(config: HeistConfig, address: str, *, streaming: bool = True) -> Client:
    return a2a_client(config, address, streaming=streaming)


async def stream_heist(
    config: HeistConfig, address: str, token: str, **options: object
) -> list[a2a_pb2.StreamResponse]:
    events = []
    async with client(config, address) as a2a:
        async for event in a2a.send_message(heist_request("Rob the bank.", **options), context=bearer(token)):  # type: ignore[arg-type]
            events.append(event)
    return events


def turn_updates(events: list[a2a_pb2.StreamResponse]) -> list[a2a_pb2.TaskStatusUpdateEvent]:
    return [
        event.status_update for event in events
        if event.HasField("status_update") and "turn" in event.status_update.status.message.metadata
    ]  # fmt: skip


async def test_a_streamed_heist_sends_each_turn_then_completes_and_is_audited(
    config: HeistConfig, address: str, mesh: ProcessMesh
) -> None:
    token = oauth_token(config, "alice")
    events = await stream_heist(config, address, token, turns=TURNS, seed=7)
    task_id = events[0].task.id
    assert task_id.startswith("heist_")
    updates = turn_updates(events)
    assert len(updates) == TURNS
    assert [int(u.status.message.metadata["turn"]) for u in updates] == list(range(1, TURNS + 1))
    first = updates[0].status.message
    assert first.metadata["agent"] == "planner" and first.parts[0].text
    assert any(part.HasField("data") for u in updates for part in u.status.message.parts), "tool calls as parts"
    final = events[-1].status_update.status
    assert final.state == a2a_pb2.TASK_STATE_COMPLETED
    rows = mesh.rows("SELECT status, num_turns, client_id FROM sessions WHERE session_id = ?", task_id)
    assert rows == [("completed", TURNS, "alice")]
    turn_ids = [r[0] for r in mesh.rows("SELECT turn_id FROM messages WHERE session_id = ? ORDER BY id", task_id)]
    assert turn_ids == list(range(1, TURNS + 1))

    async with client(config, address) as a2a:
        task = await a2a.get_task(a2a_pb2.GetTaskRequest(id=task_id), context=bearer(token))
    assert task.status.state == a2a_pb2.TASK_STATE_COMPLETED
    assert [int(m.metadata["turn"]) for m in task.history] == list(range(1, TURNS + 1))
    assert task.history[0].parts[0].text == updates[0].status.message.parts[0].text

    # The service's /metrics counts the tokens its heists spent, per agent (never per session).
    with urllib.request.urlopen(mesh.metrics_url("orchestrator"), timeout=10) as response:
        exposition = response.read().decode()
    families = {family.name: family for family in text_string_to_metric_families(exposition)}
    tokens = [sample for sample in families["heist_llm_tokens"].samples if sample.name == "heist_llm_tokens_total"]
    assert {sample.labels["agent"] for sample in tokens} >= {"planner"} and all(s.value > 0 for s in tokens)
    assert all("session" not in sample.labels for sample in tokens)
    assert "heist_tool_approvals_pending" in families


async def test_list_shows_only_the_callers_tasks_and_others_get_not_found(config: HeistConfig, address: str) -> None:
    alice, bob = oauth_token(config, "alice"), oauth_token(config, "bob")
    async with client(config, address, streaming=False) as a2a:
        started = []
        for _ in range(2):
            async for event in a2a.send_message(heist_request(turns=2, immediately=True), context=bearer(bob)):
                started.append(event.task.id)
        assert len(started) == 2
        page = await a2a.list_tasks(a2a_pb2.ListTasksRequest(page_size=1), context=bearer(bob))
        assert page.total_size == 2 and len(page.tasks) == 1 and page.next_page_token
        rest = await a2a.list_tasks(
            a2a_pb2.ListTasksRequest(page_size=1, page_token=page.next_page_token), context=bearer(bob)
        )
        assert {page.tasks[0].id, rest.tasks[0].id} == set(started) and not rest.next_page_token
        theirs = await a2a.list_tasks(a2a_pb2.ListTasksRequest(page_size=100), context=bearer(alice))
        assert not set(started) & {task.id for task in theirs.tasks}
        for call in (
            a2a.get_task(a2a_pb2.GetTaskRequest(id=started[0]), context=bearer(alice)),
            a2a.cancel_task(a2a_pb2.CancelTaskRequest(id=started[0]), context=bearer(alice)),
        ):
            with pytest.raises(Exception) as refused:
                await call
            assert status_code(refused.value) == grpc.StatusCode.NOT_FOUND


async def test_cancel_mid_run_ends_the_task_canceled_and_the_session_cancelled(
    config: HeistConfig, address: str, mesh: ProcessMesh
) -> None:
    token = oauth_token(config, "alice")
    async with client(config, address) as a2a:
        task_id = ""
        async for event in a2a.send_message(heist_request(turns=20), context=bearer(token)):
            if event.HasField("task"):
                task_id = event.task.id
            if turn_updates([event]):
                break  # one turn done: the heist is running
        cancelled = await a2a.cancel_task(a2a_pb2.CancelTaskRequest(id=task_id), context=bearer(token))
        assert cancelled.status.state == a2a_pb2.TASK_STATE_CANCELED
        task = await a2a.get_task(a2a_pb2.GetTaskRequest(id=task_id), context=bearer(token))
    assert task.status.state == a2a_pb2.TASK_STATE_CANCELED
    [(status, turns, error)] = mesh.rows("SELECT status, num_turns, error FROM sessions WHERE session_id = ?", task_id)
    assert status == "cancelled" and 1 <= turns < 20 and "alice" in error
    assert mesh.rows("SELECT operation FROM events WHERE session_id = ? AND operation = 'cancel'", task_id)


@pytest.mark.parametrize(
    ("token_of", "code"),
    [(None, grpc.StatusCode.UNAUTHENTICATED), ("reader", grpc.StatusCode.PERMISSION_DENIED)],
)
async def test_a_start_without_token_or_scope_is_refused(
    config: HeistConfig, address: str, token_of: str | None, code: grpc.StatusCode
) -> None:
    context = bearer(oauth_token(config, token_of)) if token_of else None
    async with client(config, address, streaming=False) as a2a:
        with pytest.raises(Exception) as refused:
            async for _ in a2a.send_message(heist_request(turns=2, immediately=True), context=context):
                pass
    assert status_code(refused.value) == code


async def test_bad_requests_and_limits_get_clear_statuses(config: HeistConfig, address: str) -> None:
    token = oauth_token(config, "bob")
    async with client(config, address, streaming=False) as a2a:
        for request, code, words in [
            (heist_request(turns=21), grpc.StatusCode.INVALID_ARGUMENT, "'turns' must be 1..20"),
            (heist_request(turns=2, colour="red"), grpc.StatusCode.INVALID_ARGUMENT, "unknown key(s) colour"),
        ]:
            with pytest.raises(Exception) as refused:
                async for _ in a2a.send_message(request, context=bearer(token)):
                    pass
            assert status_code(refused.value) == code and words in str(refused.value)
        # three heists at once are bob's limit (max_sessions_per_client = 3): the fourth is refused
        for _ in range(100):  # bob's short heists of the test before end first
            working = a2a_pb2.ListTasksRequest(status=a2a_pb2.TASK_STATE_WORKING)
            if not (await a2a.list_tasks(working, context=bearer(token))).tasks:
                break
            await asyncio.sleep(0.1)
        running = []
        for _ in range(3):
            async for event in a2a.send_message(heist_request(turns=20, immediately=True), context=bearer(token)):
                running.append(event.task.id)
        with pytest.raises(Exception) as refused:
            async for _ in a2a.send_message(heist_request(turns=2, immediately=True), context=bearer(token)):
                pass
        assert status_code(refused.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_sessions_per_client" in str(refused.value)
        for task_id in running:
            await a2a.cancel_task(a2a_pb2.CancelTaskRequest(id=task_id), context=bearer(token))


async def test_subscribe_follows_a_running_heist_and_the_card_describes_the_crew(
    config: HeistConfig, address: str
) -> None:
    token = oauth_token(config, "alice")
    async with client(config, address) as a2a:
        task_id = ""
        async for event in a2a.send_message(heist_request(turns=4, immediately=True), context=bearer(token)):
            task_id = event.task.id
            break
        followed = [event async for event in a2a.subscribe(a2a_pb2.SubscribeToTaskRequest(id=task_id),
                                                           context=bearer(token))]  # fmt: skip
        card = await a2a.get_extended_agent_card(a2a_pb2.GetExtendedAgentCardRequest(), context=bearer(token))
    assert followed[-1].status_update.status.state == a2a_pb2.TASK_STATE_COMPLETED
    assert 1 <= len(turn_updates(followed)) <= 4
    assert [skill.id for skill in card.skills] == [agent.name for agent in config.agents]
    assert "calculator" in next(skill for skill in card.skills if skill.id == "safecracker").tags
    assert card.supported_interfaces[0].protocol_binding == "GRPC" and card.capabilities.streaming
    assert "mesh_oauth" in card.security_schemes


async def test_kill_9_mid_run_then_restart_leaves_the_session_resumable_with_no_row_lost_or_doubled(
    config: HeistConfig, address: str, mesh: ProcessMesh, tmp_path: Path
) -> None:
    token = oauth_token(config, "alice")
    async with client(config, address) as a2a:
        task_id, seen = "", 0
        async for event in a2a.send_message(heist_request(turns=12), context=bearer(token)):
            task_id = task_id or event.task.id
            seen += len(turn_updates([event]))
            if seen == 2:
                break
    server = mesh.servers["orchestrator"]
    server.kill9()
    done = mesh.rows("SELECT num_turns FROM sessions WHERE session_id = ?", task_id)[0][0]
    server.start()
    [(status, error)] = mesh.rows("SELECT status, error FROM sessions WHERE session_id = ?", task_id)
    assert status == "interrupted" and f"orchestrator resume {task_id}" in error
    async with client(config, address) as a2a:
        task = await a2a.get_task(a2a_pb2.GetTaskRequest(id=task_id), context=bearer(token))
    assert task.status.state == a2a_pb2.TASK_STATE_FAILED and "resumable" in task.status.message.parts[0].text
    assert len(task.history) == done
    process = await asyncio.create_subprocess_exec(
        str(Path(".venv/bin/orchestrator").resolve()), "resume", task_id, "--config", str(config.config_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, output.decode()
    turn_ids = [r[0] for r in mesh.rows("SELECT turn_id FROM messages WHERE session_id = ? ORDER BY id", task_id)]
    assert turn_ids == list(range(1, 13))
    assert mesh.rows("SELECT status FROM sessions WHERE session_id = ?", task_id) == [("completed",)]


async def orchestrator(*args: str, timeout_s: float = 120) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(Path(".venv/bin/orchestrator").resolve()), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_run_via_the_service_prints_the_turns_and_summary_of_an_in_process_run(
    config: HeistConfig, address: str, mesh: ProcessMesh
) -> None:
    via = ["run", "--turns", "4", "--seed", "3", "--config", str(config.config_path)]
    code, out, err = await orchestrator(*via, "--via", address, "--client", "alice")
    assert code == 0, err
    local_code, local, local_err = await orchestrator(*via)
    assert local_code == 0, local_err
    turn_lines = [line for line in out.splitlines() if line.startswith("[turn ")]
    assert [line.split(")")[0] for line in turn_lines] == [
        line.split(")")[0] for line in local.splitlines() if line.startswith("[turn ")
    ]
    assert len(turn_lines) == 4 and "    tool " in out
    session_id = out.split("Session:")[1].split()[0]
    assert "(completed)" in out and "Tool calls:" in out and "Audit DB:" in out
    assert mesh.rows("SELECT client_id, num_turns FROM sessions WHERE session_id = ?", session_id) == [("alice", 4)]

    code, _, err = await orchestrator(
        "run", "--turns", "25", "--config", str(config.config_path), "--via", address, "--client", "alice"
    )
    assert code == 2 and "INVALID_ARGUMENT" in err and "'turns' must be 1..20" in err and "Traceback" not in err
    code, _, err = await orchestrator(
        "run", "--config", str(config.config_path), "--via", address, "--client", "nobody"
    )
    assert code == 1 and "no token for client 'nobody'" in err and "Traceback" not in err


async def test_watch_follows_from_the_service_and_from_the_audit(
    config: HeistConfig, address: str, mesh: ProcessMesh
) -> None:
    token = oauth_token(config, "alice")
    async with client(config, address, streaming=False) as a2a:
        async for event in a2a.send_message(heist_request(turns=20, immediately=True), context=bearer(token)):
            task_id = event.task.id
    code, out, err = await orchestrator(
        "watch", task_id, "--json", "--via", address, "--client", "alice", "--config", str(config.config_path)
    )
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["turn"] for line in lines[:-1]] == list(range(1, 21))
    assert lines[-1]["type"] == "end" and lines[-1]["source"] == "service"
    # bob does not own it: the service says NOT_FOUND, and the audit (read locally) has it all
    code, out, err = await orchestrator("watch", task_id, "--via", address, "--client", "bob",
                                        "--config", str(config.config_path))  # fmt: skip
    assert code == 0, err
    assert out.count("[turn ") == 20 and "completed" in out and "(from the audit)" in out


async def test_orchestrator_serve_is_the_service_and_stops_on_sigterm(config: HeistConfig) -> None:
    from tests.support.ports import free_port
    from tests.support.processes import health_status

    address = f"127.0.0.1:{free_port()}"
    process = await asyncio.create_subprocess_exec(
        str(Path(".venv/bin/orchestrator").resolve()), "serve", "--config", str(config.config_path),
        "--address", address, "--metrics-address", "127.0.0.1:0",  # the module's service has the configured one
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        for _ in range(300):
            if health_status(config, "orchestrator", address) == "SERVING":
                break
            await asyncio.sleep(0.1)
        assert health_status(config, "orchestrator", address, grpc_service="lf.a2a.v1.A2AService") == "SERVING"
    finally:
        process.terminate()
        output, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, output.decode()
    assert "stopped" in output.decode()


async def test_stopping_the_service_interrupts_its_heists_resumably(
    config: HeistConfig, address: str, mesh: ProcessMesh
) -> None:
    token = oauth_token(config, "alice")
    async with client(config, address, streaming=False) as a2a:
        async for event in a2a.send_message(heist_request(turns=20, immediately=True), context=bearer(token)):
            task_id = event.task.id
    for _ in range(200):
        if mesh.rows("SELECT num_turns FROM sessions WHERE session_id = ?", task_id)[0][0] >= 1:
            break
        await asyncio.sleep(0.05)
    server = mesh.servers["orchestrator"]
    server.stop()  # SIGTERM: drain, then the running heists end
    try:
        [(status, error)] = mesh.rows("SELECT status, error FROM sessions WHERE session_id = ?", task_id)
        assert status == "interrupted" and error == "interrupted"
    finally:
        server.start()
