"""The MCP gateway against real processes (``make serve``'s supervisor), with the ``mcp`` SDK's own client.

Tokens come from the mesh's OAuth service (client credentials); the gateway serves HTTPS with the mesh's
certificates, as shipped (``security.transport: mtls``).
"""

from __future__ import annotations

import http.client
import json
import os
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx2
import jsonschema
import pytest
import yaml
from heist.oauth.v1 import oauth_pb2, oauth_pb2_grpc
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from heist_common import tls
from heist_common.config import HeistConfig, load_config
from heist_common.credentials import client_secret
from heist_common.tools.argument_grammars import argument_hint
from heist_common.tools.registry import ToolRegistry, message_schema
from tests.support.access_log import calls
from tests.support.config import TOOLS, heist_config
from tests.support.otlp import OTLPReceiver
from tests.support.ports import free_ports

GATEWAY_CLIENT_SCOPES = ["calculator:use", "file_reader:use", "database_query:use"]
EXAMPLES: dict[str, dict[str, Any]] = {
    "calculator_evaluate": {"expression": "6 * 7"},
    "file_reader_read_file": {"filename": "bank_layout.md"},
    "file_reader_list_files": {},
    "database_query_query": {"sql": "SELECT name FROM guards LIMIT 2"},
    "database_query_list_tables": {},
}
"""Good arguments for every tool the shipped services offer (the test fails if a tool has none here)."""


@contextmanager
def serving(work: Path, transport: str = "mtls", env: dict[str, str] | None = None) -> Iterator[HeistConfig]:
    """The mesh and the gateway as ``make serve`` runs them, on free ports; stopped at the end."""
    data = heist_config(work, transport=transport)
    names = list(data["services"])
    ports = free_ports(len(names) + 2)
    for name, port in zip(names, ports, strict=False):
        data["services"][name]["address"] = f"127.0.0.1:{port}"
    data["oauth"]["clients"] = {**data["oauth"]["clients"], "mcp_gateway": GATEWAY_CLIENT_SCOPES}
    data["mcp_gateway"] = {
        "address": f"127.0.0.1:{ports[-2]}",
        "metrics_address": f"127.0.0.1:{ports[-1]}",
        "calls_per_second": 1000.0,
        "burst": 1000,
    }
    path = work / "heist.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    supervisor = [sys.executable, "-m", "servers.supervisor"]
    try:
        started = subprocess.run([*supervisor, "serve", "--config", str(path)], capture_output=True, text=True,
                                 timeout=120, env={**os.environ, **(env or {})})  # fmt: skip
        assert started.returncode == 0, started.stdout + started.stderr
        yield load_config(path)
    finally:
        subprocess.run([*supervisor, "stop", "--config", str(path)], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeistConfig]:
    with serving(tmp_path_factory.mktemp("mcp")) as config:
        yield config


def token_for(config: HeistConfig, client_id: str) -> str:
    """A token from the mesh's OAuth service, by client credentials (the secret never on a command line)."""
    address = config.service("oauth").address
    with tls.sync_channel(config, address, service="oauth", identity="grpcurl") as channel:
        request = oauth_pb2.IssueTokenRequest(
            grant_type="client_credentials", client_id=client_id, client_secret=client_secret(config, client_id)
        )
        response = oauth_pb2_grpc.OAuthServiceStub(channel).IssueToken(request, timeout=5)
    return str(response.access_token)


def url(config: HeistConfig, path: str = "/mcp") -> str:
    assert config.mcp_gateway is not None
    return f"{'https' if tls.mtls(config) else 'http'}://{config.mcp_gateway.address}{path}"


def ca_context(config: HeistConfig) -> ssl.SSLContext | None:
    return ssl.create_default_context(cafile=tls.tls_dir(config) / "ca.crt") if tls.mtls(config) else None


@asynccontextmanager
async def mcp_session(config: HeistConfig, client_id: str, **headers: str) -> AsyncIterator[ClientSession]:
    """An initialized MCP session over Streamable HTTP as ``client_id``."""
    all_headers = {"Authorization": f"Bearer {token_for(config, client_id)}", **headers}
    async with (
        httpx2.AsyncClient(headers=all_headers, verify=ca_context(config) or True, timeout=30) as http,
        streamable_http_client(url(config), http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


def audit_rows(config: HeistConfig, session_id: str) -> list[tuple[Any, ...]]:
    path = config.database.url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as database:
        return database.execute(
            "SELECT agent_name, tool_name, operation, success, status_code FROM tool_usage WHERE session_id = ?"
            " ORDER BY id",
            (session_id,),
        ).fetchall()


async def test_initialize_names_the_gateway(served: HeistConfig) -> None:
    all_headers = {"Authorization": f"Bearer {token_for(served, 'crew')}"}
    async with (
        httpx2.AsyncClient(headers=all_headers, verify=ca_context(served) or True, timeout=30) as http,
        streamable_http_client(url(served), http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        result = await session.initialize()
    assert result.server_info.name == "heist-mcp-gateway"
    assert result.capabilities.tools is not None


async def test_tools_list_matches_the_protos_with_the_live_constraints(served: HeistConfig) -> None:
    registry = ToolRegistry.for_services(TOOLS)
    async with mcp_session(served, "crew") as session:
        listed = {tool.name: tool for tool in (await session.list_tools()).tools}
    methods = {method.function_name: method for service in registry.services.values() for method in service.methods}
    assert set(listed) == set(methods) == set(EXAMPLES)
    for name, tool in listed.items():
        method = methods[name]
        assert tool.description == method.description
        assert tool.output_schema == message_schema(method.method.output_type, output=True)
        schema = tool.input_schema
        assert set(schema["properties"]) == {field.name for field in method.method.input_type.fields}
        hint = argument_hint(method.method)
        if hint is None:
            assert schema == method.parameters
            continue
        constrained = schema["properties"][hint.field.name]
        assert "enum" in constrained or "pattern" in constrained, (name, constrained)
    documents = sorted(path.name for path in (Path("servers") / "data" / "documents").iterdir())
    assert listed["file_reader_read_file"].input_schema["properties"]["filename"]["enum"] == documents
    sql = listed["database_query_query"].input_schema["properties"]["sql"]
    jsonschema.validate(EXAMPLES["database_query_query"]["sql"], sql)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate("SELECT * FROM no_such_table", sql)


async def test_every_tool_can_be_called_and_answers_structured_content(served: HeistConfig) -> None:
    async with mcp_session(served, "crew") as session:
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
        for name, arguments in EXAMPLES.items():
            result = await session.call_tool(name, arguments)
            assert not result.is_error, (name, result.content)
            assert result.structured_content is not None
            jsonschema.validate(result.structured_content, tools[name].output_schema)
        evaluated = await session.call_tool("calculator_evaluate", {"expression": "6 * 7"})
    assert evaluated.structured_content is not None and evaluated.structured_content["value"] == 42


async def test_bad_arguments_are_a_tool_error_with_the_services_message(served: HeistConfig) -> None:
    async with mcp_session(served, "crew") as session:
        divided = await session.call_tool("calculator_evaluate", {"expression": "1/0"})
        unknown_field = await session.call_tool("calculator_evaluate", {"nonsense": 1})
    assert divided.is_error
    assert divided.content[0].text == "INVALID_ARGUMENT: division by zero"  # type: ignore[union-attr]
    assert unknown_field.is_error and "nonsense" in unknown_field.content[0].text  # type: ignore[union-attr]


def test_no_token_is_http_401_pointing_at_the_resource_metadata(served: HeistConfig) -> None:
    request = urllib.request.Request(url(served), data=b"{}", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, context=ca_context(served), timeout=10)
    assert refused.value.code == 401
    challenge = refused.value.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer") and "resource_metadata=" in challenge
    with urllib.request.urlopen(url(served, "/.well-known/oauth-protected-resource"), context=ca_context(served),
                                timeout=10) as response:  # fmt: skip
        metadata = json.loads(response.read())
    assert metadata["resource"] == url(served)
    assert metadata["authorization_servers"] == [f"https://{served.service('oauth').address}/"]
    assert set(metadata["scopes_supported"]) == set(GATEWAY_CLIENT_SCOPES)


async def test_a_token_without_the_tools_scope_sees_and_calls_only_its_tools(served: HeistConfig) -> None:
    async with mcp_session(served, "hacker") as session:  # file_reader:use only
        listed = {tool.name for tool in (await session.list_tools()).tools}
        refused = await session.call_tool("calculator_evaluate", {"expression": "1+1"})
        allowed = await session.call_tool("file_reader_list_files", {})
    assert listed == {"file_reader_read_file", "file_reader_list_files"}
    assert refused.is_error
    assert "PERMISSION_DENIED" in refused.content[0].text and "calculator:use" in refused.content[0].text  # type: ignore[union-attr]
    assert not allowed.is_error
    rows = audit_rows(served, "mcp-hacker")
    assert ("hacker", "calculator", "Evaluate", 0, "PERMISSION_DENIED") in rows
    assert ("hacker", "file_reader", "ListFiles", 1, "OK") in rows


async def test_every_call_is_an_audit_row_under_the_callers_client(served: HeistConfig) -> None:
    before = len(audit_rows(served, "mcp-safecracker"))
    async with mcp_session(served, "safecracker", **{"x-session-id": "mcp_audit_1"}) as session:
        await session.call_tool("calculator_evaluate", {"expression": "2 + 2"})
        await session.call_tool("calculator_evaluate", {"expression": "2 +"})
    rows = audit_rows(served, "mcp-safecracker")[before:]
    assert rows == [
        ("safecracker", "calculator", "Evaluate", 1, "OK"),
        ("safecracker", "calculator", "Evaluate", 0, "INVALID_ARGUMENT"),
    ]
    path = served.database.url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as database:
        status, strategy = database.execute(
            "SELECT status, strategy FROM sessions WHERE session_id = 'mcp-safecracker'"
        ).fetchone()
    assert (status, strategy) == ("gateway", "mcp_gateway")


async def test_the_tool_service_sees_the_gateway_the_caller_and_the_session(served: HeistConfig) -> None:
    async with mcp_session(served, "safecracker", **{"x-session-id": "mcp_seen_1"}) as session:
        await session.call_tool("calculator_evaluate", {"expression": "3 * 3"})
    log = served.mesh.log_dir / "calculator.log"
    deadline = time.monotonic() + 30
    seen: list[dict[str, Any]] = []
    while not seen and time.monotonic() < deadline:  # the access log is written in batches
        seen = [entry for entry in calls(log.read_text(), "Evaluate") if entry["session"] == "mcp_seen_1"]
        time.sleep(0.1)
    assert len(seen) == 1
    assert (seen[0]["client"], seen[0]["on_behalf_of"], seen[0]["code"]) == ("mcp_gateway", "safecracker", "OK")


def test_a_request_body_over_the_bound_is_http_413(served: HeistConfig) -> None:
    """A declared length over the bound is refused before the body is read.

    The request goes out as headers only, as a client waiting for ``100 Continue``
    would send it: the gateway answers at once, and a client still pushing a big
    body over TLS could see the connection close before it reads the 413.
    """
    assert served.mcp_gateway is not None
    parsed = urllib.parse.urlsplit(url(served))
    assert parsed.hostname is not None and parsed.port is not None
    connection = http.client.HTTPSConnection(parsed.hostname, parsed.port, context=ca_context(served), timeout=10)
    try:
        connection.putrequest("POST", parsed.path)
        connection.putheader("Authorization", f"Bearer {token_for(served, 'crew')}")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Accept", "application/json, text/event-stream")
        connection.putheader("Content-Length", str(served.mcp_gateway.max_request_bytes + 1))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413, response.read()
    finally:
        connection.close()


def test_the_supervisor_reports_it_and_it_serves_metrics(served: HeistConfig) -> None:
    status = subprocess.run(
        [sys.executable, "-m", "servers.supervisor", "status", "--config", str(served.config_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert status.returncode == 0, status.stdout + status.stderr
    assert any(line.startswith("mcp_gateway") and "SERVING" in line for line in status.stdout.splitlines())
    assert served.mcp_gateway is not None and served.mcp_gateway.metrics_address
    with urllib.request.urlopen(f"http://{served.mcp_gateway.metrics_address}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert "heist_mcp_tool_calls_total" in text


async def test_a_plaintext_mesh_gets_a_plain_http_gateway_whose_calls_are_traced(tmp_path: Path) -> None:
    with OTLPReceiver() as receiver:
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"}
        with serving(tmp_path, transport="plaintext", env=otel) as config:
            assert url(config).startswith("http://")
            async with mcp_session(config, "crew") as session:
                result = await session.call_tool("calculator_evaluate", {"expression": "2 ** 10"})
            assert not result.is_error and result.structured_content is not None
            assert result.structured_content["value"] == 1024
        # stopped: every process flushed its spans
        assert receiver.rejected == []
        spans = receiver.spans
    (relayed,) = [span for span in spans if span.name == "mcp tools/call calculator_evaluate"]
    assert relayed.service == "heist-mcp_gateway" and relayed.attributes["heist.client"] == "crew"
    continued = [span for span in spans if span.service == "heist-calculator" and span.trace_id == relayed.trace_id]
    assert [span.parent_span_id for span in continued] == [relayed.span_id]
