"""A new tool service is one proto, one servicer and config: nothing else is edited.

In a copy of the source tree, this adds a ``lockpick`` service (a contract in
``protos/heist/lockpick/v1/lockpick.proto`` and a servicer in
``servers/lockpick.py``), regenerates the contracts, and changes only the config
file. Then, with no edit to existing code: the supervisor serves it with health
and reflection, grpcurl sees and describes it, its scope is enforced, an agent
is offered it and calls it, and the call is audited; the MCP gateway lists it
and an MCP client calls it.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from heist_common.layout import REPO_ROOT
from tests.e2e.harness import grpcurl as harness_grpcurl
from tests.support.config import heist_config
from tests.support.ports import free_ports
from tests.support.scripted_llm import ScriptedLLM, inline_tool, text

PROTO = """syntax = "proto3";

// A lock-picking estimator for the crew's locksmith.
package heist.lockpick.v1;

import "heist/auth/v1/options.proto";
import "heist/tools/v1/options.proto";

// Estimates how long a lock takes to pick.
service LockpickService {
  // Estimates the seconds needed to pick a lock model.
  rpc Estimate(EstimateRequest) returns (EstimateResponse) {
    option (heist.auth.v1.required_scope) = "lockpick:use";
    option (heist.tools.v1.tool_description) = "Estimate how many seconds picking a lock model takes.";
    option (heist.tools.v1.inline_default) = true;
  }
}

// Request for Estimate.
message EstimateRequest {
  // The lock model, e.g. "Chubb 3000".
  string lock_model = 1 [(heist.tools.v1.argument_description) = "Lock model, e.g. Chubb 3000"];
}

// Response for Estimate.
message EstimateResponse {
  // Seconds to pick it.
  int32 seconds = 1;
}
"""

SERVICER = '''"""Lockpick service: how long a lock takes (a test tool added by one proto, one servicer and config)."""

from __future__ import annotations

from typing import Any

import grpc
from heist.lockpick.v1 import lockpick_pb2, lockpick_pb2_grpc
from pydantic import Field

from heist_common.config import HeistConfig
from servers.runtime import lifecycle
from servers.runtime.lifecycle import ServiceDefinition


class Limits(lifecycle.Limits):
    """``services.lockpick.limits``."""

    max_model_chars: int = Field(40, ge=1, strict=True)


class LockpickServicer(lockpick_pb2_grpc.LockpickServiceServicer):
    """Serves heist.lockpick.v1.LockpickService."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits

    async def Estimate(
        self, request: lockpick_pb2.EstimateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> lockpick_pb2.EstimateResponse:
        """Estimate from the model name's length (a toy rule)."""
        if not request.lock_model or len(request.lock_model) > self._limits.max_model_chars:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "lock_model must be 1-40 characters")
        return lockpick_pb2.EstimateResponse(seconds=10 * len(request.lock_model))


def service_definition(config: HeistConfig, limits: Limits) -> ServiceDefinition:
    """Build the lockpick servicer."""
    return ServiceDefinition("lockpick", LockpickServicer(limits))


if __name__ == "__main__":
    raise SystemExit(lifecycle.main(__spec__))
'''

COPIED = ("heist_common", "servers", "orchestrator", "protos", "config")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the source tree plus the new service's two files, with contracts generated."""
    root = tmp_path_factory.mktemp("tree")
    for name in COPIED:
        shutil.copytree(REPO_ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (root / "protos" / "heist" / "lockpick" / "v1").mkdir(parents=True)
    (root / "protos" / "heist" / "lockpick" / "v1" / "lockpick.proto").write_text(PROTO)
    (root / "servers" / "lockpick.py").write_text(SERVICER)
    generated = subprocess.run(
        [sys.executable, "protos/generate.py"], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert generated.returncode == 0, generated.stderr
    return root


def run(tree: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run Python in the copied tree: its packages shadow the installed ones."""
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'generated'}"}
    return subprocess.run([sys.executable, *args], cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)


def grpcurl(
    served: dict[str, Any], service: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """grpcurl to ``service`` over mTLS with the served mesh's generated grpcurl client certificate."""
    return harness_grpcurl(*args, service=service, run_dir=served["work"] / "run", stdin=stdin)


@pytest.fixture(scope="module")
def served(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("lockpick")
    llm = ScriptedLLM().start()
    data = heist_config(work, llm_base_url=llm.base_url)
    names = [*data["services"], "lockpick", "mcp_gateway"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    data["services"]["lockpick"] = {"address": "127.0.0.1:0", "deadline_s": 1.0, "limits": {"max_model_chars": 40}}
    for name, port in ports.items():
        if name in data["services"]:
            data["services"][name]["address"] = f"127.0.0.1:{port}"
    data["oauth"]["clients"]["locksmith"] = ["lockpick:use"]
    data["oauth"]["clients"]["mcp_gateway"] = ["lockpick:use"]
    data["mcp_gateway"] = {"address": f"127.0.0.1:{ports['mcp_gateway']}"}
    locksmith = {"name": "locksmith", "role": "Locksmith", "system_prompt": "You open locks.", "tools": ["lockpick"]}
    data["agents"] = [data["agents"][0], locksmith]
    config = work / "heist.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        started = run(tree, "-m", "servers.supervisor", "serve", "--config", str(config), "--llm", "off")
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"config": config, "ports": ports, "llm": llm, "work": work}
    finally:
        run(tree, "-m", "servers.supervisor", "stop", "--config", str(config))
        llm.stop()


def test_the_supervisor_serves_it_with_health_and_reflection(tree: Path, served: dict[str, Any]) -> None:
    status = run(tree, "-m", "servers.supervisor", "status", "--config", str(served["config"]))
    assert status.returncode == 0, status.stdout + status.stderr
    assert any(line.startswith("lockpick") and "SERVING" in line for line in status.stdout.splitlines())
    address = f"127.0.0.1:{served['ports']['lockpick']}"
    listed = grpcurl(served, "lockpick", address, "list")
    assert listed.returncode == 0, listed.stderr
    assert "heist.lockpick.v1.LockpickService" in listed.stdout.split()
    described = grpcurl(served, "lockpick", address, "describe", "heist.lockpick.v1.LockpickService")
    assert 'option (.heist.auth.v1.required_scope) = "lockpick:use";' in described.stdout
    request = '{"service": "heist.lockpick.v1.LockpickService"}'
    health = grpcurl(served, "lockpick", "-d", request, address, "grpc.health.v1.Health/Check")
    assert json.loads(health.stdout) == {"status": "SERVING"}


def test_its_scope_is_enforced(served: dict[str, Any]) -> None:
    address = f"127.0.0.1:{served['ports']['lockpick']}"
    estimate = "heist.lockpick.v1.LockpickService/Estimate"
    anonymous = grpcurl(served, "lockpick", "-d", '{"lock_model": "Chubb"}', address, estimate)
    assert anonymous.returncode != 0 and "Code: Unauthenticated" in anonymous.stderr
    secrets = json.loads((served["work"] / "run" / "credentials" / "clients.json").read_text())
    grant = {"grant_type": "client_credentials", "client_id": "hacker", "client_secret": secrets["hacker"]}
    oauth = f"127.0.0.1:{served['ports']['oauth']}"
    issue = "heist.oauth.v1.OAuthService/IssueToken"
    issued = grpcurl(served, "oauth", "-d", "@", oauth, issue, stdin=json.dumps(grant))  # the secret via stdin
    token = json.loads(issued.stdout)["access_token"]
    denied = grpcurl(served, "lockpick",
        "-H", f"authorization: Bearer {token}", "-d", '{"lock_model": "Chubb"}', address,
        "heist.lockpick.v1.LockpickService/Estimate",
    )  # fmt: skip
    assert denied.returncode != 0 and "Code: PermissionDenied" in denied.stderr and "lockpick:use" in denied.stderr


def test_an_agent_is_offered_it_calls_it_and_the_call_is_audited(tree: Path, served: dict[str, Any]) -> None:
    llm: ScriptedLLM = served["llm"]
    llm.script(text("We need the vault lock."), inline_tool("lockpick", "Chubb 3000"))
    result = run(
        tree, "-m", "orchestrator.cli", "run", "--config", str(served["config"]),
        "--turns", "2", "--session-id", "heist_lockpick_1",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    offered = llm.chat_requests[1]["messages"][0]["content"]
    assert "lockpick: Estimate how many seconds picking a lock model takes." in offered
    database = sqlite3.connect(served["work"] / "audit.db")
    rows = database.execute(
        "SELECT agent_name, tool_name, operation, tool_result, success FROM tool_usage WHERE session_id = ?",
        ("heist_lockpick_1",),
    ).fetchall()
    assert rows == [("locksmith", "lockpick", "Estimate", "100", 1)]


async def test_the_mcp_gateway_lists_it_and_an_mcp_client_calls_it(served: dict[str, Any]) -> None:
    import ssl

    import httpx2
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    run_dir = served["work"] / "run"
    secrets = json.loads((run_dir / "credentials" / "clients.json").read_text())
    grant = {"grant_type": "client_credentials", "client_id": "locksmith", "client_secret": secrets["locksmith"]}
    oauth = f"127.0.0.1:{served['ports']['oauth']}"
    issue = "heist.oauth.v1.OAuthService/IssueToken"
    issued = grpcurl(served, "oauth", "-d", "@", oauth, issue, stdin=json.dumps(grant))
    token = json.loads(issued.stdout)["access_token"]
    verify = ssl.create_default_context(cafile=run_dir / "credentials" / "tls" / "ca.crt")
    url = f"https://127.0.0.1:{served['ports']['mcp_gateway']}/mcp"
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, verify=verify, timeout=30) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
        result = await session.call_tool("lockpick_estimate", {"lock_model": "Chubb 3000"})
    assert tools["lockpick_estimate"].description == "Estimate how many seconds picking a lock model takes."
    assert tools["lockpick_estimate"].input_schema["properties"]["lock_model"]["type"] == "string"
    assert not result.is_error and result.structured_content == {"seconds": 100}
