"""Throughput with h2load (nghttp2's native HTTP/2 load generator) sending gRPC frames.

Why: the Python load generators need CPU themselves, and on a 2-core machine
they take it from the server being measured; h2load uses a few percent of one
core. It sends one fixed request (a gRPC length-prefixed frame) on 4
connections x 16 streams = 64 concurrent callers, with a warm-up, for a fixed
time, and logs every request's duration (``--log-file``) for percentiles.

h2load only sees HTTP statuses, and gRPC errors come back as HTTP 200 with
``grpc-status`` in the trailers, so the gRPC status is verified separately:
the same bytes with the same metadata are first sent through a Python gRPC
client (every call must be OK), and for mesh services the server's access log
lines of the run's session must all say ``code=OK`` (except the calls still in
flight when h2load stops, which it resets: CANCELLED, at most one per caller)
and number at least as many as h2load counted.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message
from heist.calculator.v1 import calculator_pb2
from heist.database_query.v1 import database_query_pb2
from heist.file_reader.v1 import file_reader_pb2
from heist.memory.v1 import memory_pb2
from heist.oauth.v1 import oauth_pb2

from heist_common.contract import AUTHORIZATION_METADATA_KEY, SESSION_METADATA_KEY
from tests.bench.echo import METHOD as ECHO_METHOD
from tests.bench.turns import percentiles
from tests.support.access_log import access_entries

CONNECTIONS = 4
STREAMS_PER_CONNECTION = 16
WARM_UP_S = 2.0
CHECK_CALLS = 20


def available() -> str | None:
    """Path of the h2load binary, or None."""
    return shutil.which("h2load")


def request_for(kind: str, secret: str) -> tuple[str, bytes]:
    """The method path and serialized request h2load sends for ``kind`` (the same as the Python generator's)."""
    message: Message
    if kind == "echo":
        return ECHO_METHOD, b"x" * 64
    if kind == "store_memory":
        path = "/heist.memory.v1.MemoryService/StoreMemory"
        message = memory_pb2.StoreMemoryRequest(
            agent_name="agent0", turn_id=1,
            message="Guards change shifts at 22:00; the east door camera is down for maintenance.",
        )  # fmt: skip
    elif kind == "get_compressed_memory":
        path = "/heist.memory.v1.MemoryService/GetCompressedMemory"
        message = memory_pb2.GetCompressedMemoryRequest(agent_name="agent0", recent_count=5, max_chars=100)
    elif kind == "evaluate":
        path = "/heist.calculator.v1.CalculatorService/Evaluate"
        message = calculator_pb2.EvaluateRequest(expression="(120-15)*3")
    elif kind == "read_file":
        path = "/heist.file_reader.v1.FileReaderService/ReadFile"
        message = file_reader_pb2.ReadFileRequest(filename="vault_time_lock.md")
    elif kind == "query":
        path = "/heist.database_query.v1.DatabaseQueryService/Query"
        message = database_query_pb2.QueryRequest(sql="SELECT COUNT(*) FROM guards")
    elif kind == "issue_token":
        path = "/heist.oauth.v1.OAuthService/IssueToken"
        message = oauth_pb2.IssueTokenRequest(
            grant_type="client_credentials", client_id="safecracker", client_secret=secret, scopes=["calculator:use"]
        )
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return path, message.SerializeToString()


async def _check(address: str, kind: str, path: str, body: bytes, metadata: tuple[tuple[str, str], ...]) -> None:
    """Send the exact request h2load will send through a gRPC client; every call must be OK."""
    async with grpc.aio.insecure_channel(address) as channel:
        if kind == "get_compressed_memory":
            store = channel.unary_unary("/heist.memory.v1.MemoryService/StoreMemory")
            for turn in range(1, 9):
                note = memory_pb2.StoreMemoryRequest(agent_name="agent0", turn_id=turn, message=f"note {turn} " * 20)
                await store(note.SerializeToString(), metadata=metadata, timeout=5)
        call = channel.unary_unary(path)  # bytes in, bytes out: no (de)serializers
        for _ in range(CHECK_CALLS):
            await call(body, metadata=metadata, timeout=5)


def _count_log_lines(log: Path, offset: int, session: str) -> tuple[int, dict[str, int]]:
    """OK lines and other codes among the access-log lines of ``session`` after byte ``offset``."""
    ok, errors = 0, {}
    with log.open("rb") as stream:
        stream.seek(offset)
        text = stream.read().decode("utf-8", "replace")
    for entry in access_entries(text):
        if entry["session"] == session:
            code = entry["code"]
            if code == "OK":
                ok += 1
            else:
                errors[code] = errors.get(code, 0) + 1
    return ok, errors


def _parse(output: str) -> dict[str, float]:
    """req/s and counts from h2load's summary."""
    rps = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", output)
    counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                       output)  # fmt: skip
    if rps is None or counts is None:
        raise RuntimeError(f"cannot parse h2load output:\n{output[-2000:]}")
    return {
        "rps": float(rps.group(1)),
        "total": int(counts.group(1)),
        "succeeded": int(counts.group(3)),
        "failed": int(counts.group(4)) + int(counts.group(5)),
    }


def load(
    address: str, kind: str, *, duration_s: float, token: str, secret: str, server_log: Path | None
) -> dict[str, Any]:
    """Run h2load against ``address`` for ``duration_s`` (after a warm-up); verify gRPC statuses; return stats."""
    binary = available()
    if binary is None:
        raise RuntimeError("h2load not found")
    path, message = request_for(kind, secret)
    session = f"h2load_{kind}"
    metadata: tuple[tuple[str, str], ...] = ((SESSION_METADATA_KEY, session),)
    if token:
        metadata += ((AUTHORIZATION_METADATA_KEY, f"Bearer {token}"),)
    asyncio.run(_check(address, kind, path, message, metadata))
    offset = server_log.stat().st_size if server_log is not None else 0
    with tempfile.TemporaryDirectory(prefix="h2load-") as tmp:
        body = Path(tmp) / "request.bin"
        body.write_bytes(b"\x00" + struct.pack(">I", len(message)) + message)  # gRPC frame: uncompressed, length
        log_file = Path(tmp) / "requests.log"
        command = [
            binary, f"--clients={CONNECTIONS}", f"--max-concurrent-streams={STREAMS_PER_CONNECTION}", "--threads=1",
            f"--duration={duration_s:g}", f"--warm-up-time={WARM_UP_S:g}", f"--data={body}",
            f"--log-file={log_file}", "--header=content-type: application/grpc", "--header=te: trailers",
            *(f"--header={key}: {value}" for key, value in metadata),
            f"http://{address}{path}",
        ]  # fmt: skip
        completed = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + WARM_UP_S + 60)
        if completed.returncode != 0:
            raise RuntimeError(f"h2load for {kind} failed:\n{completed.stdout[-2000:]}{completed.stderr[-2000:]}")
        summary = _parse(completed.stdout)
        latencies, statuses = [], {}
        for line in log_file.read_text().splitlines():
            _, status, micros = line.split("\t")
            statuses[status] = statuses.get(status, 0) + 1
            if status == "200":
                latencies.append(int(micros) / 1000.0)
    errors = {f"HTTP_{status}": count for status, count in statuses.items() if status != "200"}
    if summary["failed"]:
        errors["h2load_failed"] = int(summary["failed"])
    cancelled_at_stop = 0
    if server_log is not None:
        time.sleep(0.6)  # the access log is flushed every 0.2 s
        ok, grpc_errors = _count_log_lines(server_log, offset, session)
        # h2load resets the streams still in flight when the time is up: up to one CANCELLED per caller
        cancelled_at_stop = grpc_errors.pop("CANCELLED", 0)
        if cancelled_at_stop > CONNECTIONS * STREAMS_PER_CONNECTION:
            grpc_errors["CANCELLED"] = cancelled_at_stop
            cancelled_at_stop = 0
        errors.update(grpc_errors)
        if ok < summary["succeeded"]:
            errors["missing_access_log_lines"] = int(summary["succeeded"]) - ok
    if not latencies:
        raise RuntimeError(f"{kind}: no successful call ({errors})")
    stats = percentiles(latencies)
    return {
        "rps": round(summary["rps"], 1),
        "requests": len(latencies),
        "errors": errors,
        "p50_ms": stats["p50_ms"],
        "p99_ms": stats["p99_ms"],
        "mean_ms": stats["mean_ms"],
        "concurrency": CONNECTIONS * STREAMS_PER_CONNECTION,
        "duration_s": duration_s,
        "generator": "h2load",
        "grpc_status_checked_by": "client check + access log" if server_log is not None else "client check",
        "cancelled_at_stop": cancelled_at_stop,
    }
