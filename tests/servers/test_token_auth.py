"""The auth matrix, run against the calculator (every service with scoped methods shares the same middleware)."""

import time

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from heist.calculator.v1 import calculator_pb2, calculator_pb2_grpc
from heist.database_query.v1 import database_query_pb2, database_query_pb2_grpc
from heist.file_reader.v1 import file_reader_pb2, file_reader_pb2_grpc

from tests.support.access_log import access_entries

REQUEST = calculator_pb2.EvaluateRequest(expression="1 + 1")


@pytest.fixture
async def stub(mesh):
    return calculator_pb2_grpc.CalculatorServiceStub(await mesh.channel("calculator"))


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def test_right_scope_is_allowed(mesh, stub):
    response = await stub.Evaluate(REQUEST, metadata=bearer(mesh.token(["calculator:use"])))
    assert response.value == 2


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [
        ([], "missing"),
        ([("authorization", "")], "missing"),
        ([("authorization", "Basic dXNlcjpwYXNz")], "Bearer <token>"),
        ([("authorization", "Bearer")], "Bearer <token>"),
        ([("authorization", "Bearer not-a-jwt")], "well-formed"),
        ([("authorization", "Bearer a.b.c")], "well-formed"),
    ],
)
async def test_missing_or_garbled_token_is_unauthenticated(stub, fails_with, metadata, fragment):
    await fails_with(stub.Evaluate(REQUEST, metadata=metadata), grpc.StatusCode.UNAUTHENTICATED, fragment)


async def test_expired_token_is_unauthenticated(mesh, stub, fails_with):
    token = mesh.token(["calculator:use"], now=time.time() - 3600, ttl_s=60)
    await fails_with(stub.Evaluate(REQUEST, metadata=bearer(token)), grpc.StatusCode.UNAUTHENTICATED, "expired")


async def test_token_forged_with_another_key_is_unauthenticated(mesh, stub, fails_with):
    token = mesh.token(["calculator:use"], key=Ed25519PrivateKey.generate())
    await fails_with(stub.Evaluate(REQUEST, metadata=bearer(token)), grpc.StatusCode.UNAUTHENTICATED, "key")


async def test_token_with_tampered_payload_is_unauthenticated(mesh, stub, fails_with):
    header, _payload, signature = mesh.token(["file_reader:use"]).split(".")
    other = mesh.token(["calculator:use"]).split(".")[1]
    forged = ".".join([header, other, signature])
    await fails_with(stub.Evaluate(REQUEST, metadata=bearer(forged)), grpc.StatusCode.UNAUTHENTICATED, "signature")


async def test_wrong_issuer_is_unauthenticated(mesh, stub, fails_with):
    token = mesh.token(["calculator:use"], issuer="someone-else")
    await fails_with(stub.Evaluate(REQUEST, metadata=bearer(token)), grpc.StatusCode.UNAUTHENTICATED, "issuer")


async def test_wrong_audience_is_unauthenticated(mesh, stub, fails_with):
    token = mesh.token(["calculator:use"], audience="another-mesh")
    await fails_with(stub.Evaluate(REQUEST, metadata=bearer(token)), grpc.StatusCode.UNAUTHENTICATED, "audience")


async def test_wrong_scope_is_permission_denied_naming_the_scope(mesh, stub, fails_with):
    token = mesh.token(["file_reader:use", "database_query:use"], client_id="hacker")
    message = await fails_with(
        stub.Evaluate(REQUEST, metadata=bearer(token)), grpc.StatusCode.PERMISSION_DENIED, "calculator:use"
    )
    assert "hacker" in message


async def test_scope_of_every_tool_method_comes_from_the_contract(mesh, fails_with):
    files = file_reader_pb2_grpc.FileReaderServiceStub(await mesh.channel("file_reader"))
    database = database_query_pb2_grpc.DatabaseQueryServiceStub(await mesh.channel("database_query"))
    calculator_only = bearer(mesh.token(["calculator:use"]))
    await fails_with(
        files.ListFiles(file_reader_pb2.ListFilesRequest(), metadata=calculator_only),
        grpc.StatusCode.PERMISSION_DENIED,
        "file_reader:use",
    )
    await fails_with(
        database.ListTables(database_query_pb2.ListTablesRequest(), metadata=calculator_only),
        grpc.StatusCode.PERMISSION_DENIED,
        "database_query:use",
    )
    assert (await files.ListFiles(file_reader_pb2.ListFilesRequest(), metadata=mesh.auth("file_reader:use"))).files


async def test_health_and_reflection_need_no_token(mesh):
    channel = await mesh.channel("calculator")
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = [service.name async for response in responses for service in response.list_services_response.service]
    assert "heist.calculator.v1.CalculatorService" in names


async def test_access_log_records_auth_verdict_client_and_session(mesh, stub):
    await stub.Evaluate(REQUEST, metadata=mesh.auth("calculator:use", session="heist_case_42"))
    token = mesh.token(["calculator:use"], now=time.time() - 3600, ttl_s=60)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Evaluate(REQUEST, metadata=[*bearer(token), ("x-session-id", "heist_case_43")])
    await mesh.stop_all()
    entries = access_entries(mesh.log.getvalue())
    ok = [entry for entry in entries if entry["session"] == "heist_case_42"]
    denied = [entry for entry in entries if entry["session"] == "heist_case_43"]
    assert len(ok) == 1 and len(denied) == 1
    assert ok[0]["method"] == "/heist.calculator.v1.CalculatorService/Evaluate" and ok[0]["code"] == "OK"
    assert (ok[0]["auth"], ok[0]["client"]) == ("ok", "crew") and ok[0]["peer"].startswith("ipv4:127.0.0.1:")
    assert ok[0]["service"] == "calculator" and isinstance(ok[0]["ms"], float)
    assert (denied[0]["code"], denied[0]["auth"], denied[0]["reason"]) == ("UNAUTHENTICATED", "denied", "expired")
