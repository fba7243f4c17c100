"""The access log cannot be forged: one JSON object per call, caller values escaped and bounded."""

from __future__ import annotations

import asyncio

import pytest
from heist.calculator.v1 import calculator_pb2, calculator_pb2_grpc

from heist_common import tls
from tests.support import raw_grpc
from tests.support.access_log import access_entries

REQUEST = calculator_pb2.EvaluateRequest(expression="1 + 1")
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
FORGED = 'evil\n{"time": "forged", "method": "/forged"}'
"""A session ID that would add a whole forged record to a line-based log."""


@pytest.fixture
async def stub(mesh):
    return calculator_pb2_grpc.CalculatorServiceStub(await mesh.channel("calculator"))


@pytest.mark.parametrize(
    ("session", "traceparent", "logged_session", "logged_trace"),
    [
        ("heist_ok_1", f"00-{TRACE}-00f067aa0ba902b7-01", "heist_ok_1", TRACE),
        (FORGED, "", FORGED, "-"),
        ("spaces session=heist_victim code=OK", "00-not-a-trace-01", "spaces session=heist_victim code=OK", "-"),
        ("\x1b[31mred\x1b[0m", f"00-{'0' * 32}-00f067aa0ba902b7-01", "\x1b[31mred\x1b[0m", "-"),
        ("x" * 5000, f"00-{TRACE.upper()}-00f067aa0ba902b7-01", "x" * 128 + "...", "-"),
    ],
)
async def test_each_call_is_one_json_line_whatever_the_caller_sends(
    mesh, stub, session, traceparent, logged_session, logged_trace
):
    # A raw HTTP/2 client: grpcio itself would refuse to send a newline or an escape character.
    token = mesh.auth("calculator:use")[0][1]
    metadata = [(b"authorization", token.encode()), (b"x-session-id", session.encode())]
    if traceparent:
        metadata.append((b"traceparent", traceparent.encode()))
    address = mesh.servers["calculator"].address
    tls_context = tls.ssl_client_context(mesh.config) if tls.mtls(mesh.config) else None
    status, _ = await asyncio.to_thread(
        raw_grpc.call, address, "/heist.calculator.v1.CalculatorService/Evaluate", REQUEST, metadata, 5.0, tls_context,
        tls.server_name("calculator"),
    )  # fmt: skip
    assert status in ("0", "3"), status  # served, or refused cleanly; never INTERNAL or UNKNOWN
    await mesh.stop_all()
    text = mesh.log.getvalue()
    entries = access_entries(text)
    assert len(entries) == 1, text
    assert len([line for line in text.splitlines() if line.startswith("{")]) == 1
    assert entries[0]["session"] == logged_session and entries[0]["trace"] == logged_trace
    assert "\x1b" not in text, "control characters are escaped, never written raw"
