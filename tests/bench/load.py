"""Load generator process: N concurrent callers of one RPC for a fixed time, latencies as JSON on stdout.

Run by the throughput benchmark (two of these processes at once, so the load
is not one Python process's loop): ``python -m tests.bench.load --address
H:P --kind store_memory --concurrency 32 --duration 10 --start-at EPOCH``.
Every process connects and warms up, waits until ``--start-at`` (wall clock)
so all generators start together, then calls as fast as each caller's
previous call returns (closed loop).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
from heist.calculator.v1 import calculator_pb2, calculator_pb2_grpc
from heist.database_query.v1 import database_query_pb2, database_query_pb2_grpc
from heist.file_reader.v1 import file_reader_pb2, file_reader_pb2_grpc
from heist.memory.v1 import memory_pb2, memory_pb2_grpc
from heist.oauth.v1 import oauth_pb2, oauth_pb2_grpc

from heist_common.contract import AUTHORIZATION_METADATA_KEY, SESSION_METADATA_KEY
from tests.bench.echo import METHOD as ECHO_METHOD

Call = Callable[[int, int], Any]
"""``call(caller, i)`` returns the awaitable of the i-th request of one caller."""


def make_call(kind: str, channel: grpc.aio.Channel, token: str, secret: str) -> Call:
    """The RPC ``kind`` names, with realistic requests and metadata."""
    session = f"load_{os.getpid()}"
    plain = ((SESSION_METADATA_KEY, session),)
    authorized = ((SESSION_METADATA_KEY, session), (AUTHORIZATION_METADATA_KEY, f"Bearer {token}"))
    memory_metadata = authorized
    if kind == "echo":
        echo = channel.unary_unary(ECHO_METHOD)
        payload = b"x" * 64
        return lambda caller, i: echo(payload, timeout=5)
    if kind == "store_memory":
        memory = memory_pb2_grpc.MemoryServiceStub(channel)
        text = "Guards change shifts at 22:00; the east door camera is down for maintenance."

        def store(caller: int, i: int) -> Any:
            request = memory_pb2.StoreMemoryRequest(agent_name=f"agent{caller}", turn_id=i % 1000 + 1, message=text)
            return memory.StoreMemory(request, metadata=memory_metadata, timeout=5)

        return store
    if kind == "get_compressed_memory":
        memory = memory_pb2_grpc.MemoryServiceStub(channel)
        get = memory_pb2.GetCompressedMemoryRequest(agent_name="agent0", recent_count=5, max_chars=100)
        return lambda caller, i: memory.GetCompressedMemory(get, metadata=memory_metadata, timeout=5)
    if kind == "evaluate":
        calculator = calculator_pb2_grpc.CalculatorServiceStub(channel)
        evaluate = calculator_pb2.EvaluateRequest(expression="(120-15)*3")
        return lambda caller, i: calculator.Evaluate(evaluate, metadata=authorized, timeout=5)
    if kind == "read_file":
        reader = file_reader_pb2_grpc.FileReaderServiceStub(channel)
        read = file_reader_pb2.ReadFileRequest(filename="vault_time_lock.md")
        return lambda caller, i: reader.ReadFile(read, metadata=authorized, timeout=5)
    if kind == "query":
        database = database_query_pb2_grpc.DatabaseQueryServiceStub(channel)
        query = database_query_pb2.QueryRequest(sql="SELECT COUNT(*) FROM guards")
        return lambda caller, i: database.Query(query, metadata=authorized, timeout=5)
    if kind == "issue_token":
        oauth = oauth_pb2_grpc.OAuthServiceStub(channel)
        issue = oauth_pb2.IssueTokenRequest(
            grant_type="client_credentials", client_id="safecracker", client_secret=secret, scopes=["calculator:use"]
        )
        return lambda caller, i: oauth.IssueToken(issue, metadata=plain, timeout=5)
    raise ValueError(f"unknown kind {kind!r}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, wait for the common start, load for ``duration`` seconds; return counts and latencies."""
    channel = grpc.aio.insecure_channel(args.address)
    call = make_call(
        args.kind, channel, os.environ.get("HEIST_BENCH_TOKEN", ""), os.environ.get("HEIST_BENCH_SECRET", "")
    )
    if args.kind == "get_compressed_memory":
        memory = memory_pb2_grpc.MemoryServiceStub(channel)
        for turn in range(1, 9):
            request = memory_pb2.StoreMemoryRequest(agent_name="agent0", turn_id=turn, message=f"note {turn} " * 20)
            metadata = (
                (SESSION_METADATA_KEY, f"load_{os.getpid()}"),
                (AUTHORIZATION_METADATA_KEY, f"Bearer {os.environ.get('HEIST_BENCH_TOKEN', '')}"),
            )
            await memory.StoreMemory(request, metadata=metadata, timeout=5)
    for i in range(50):
        await call(0, i)
    await asyncio.sleep(max(0.0, args.start_at - time.time()))
    latencies: list[float] = []
    errors: dict[str, int] = {}
    stop_at = time.perf_counter() + args.duration

    async def caller(index: int) -> None:
        i = 0
        while time.perf_counter() < stop_at:
            i += 1
            started = time.perf_counter()
            try:
                await call(index, i)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                continue
            latencies.append((time.perf_counter() - started) * 1000.0)

    began = time.perf_counter()
    await asyncio.gather(*(caller(index) for index in range(args.concurrency)))
    elapsed = time.perf_counter() - began
    await channel.close()
    return {"count": len(latencies), "elapsed_s": elapsed, "errors": errors, "latencies_ms": latencies}


def main() -> None:
    """Parse arguments, run, print one JSON object."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--kind", required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--start-at", type=float, default=0.0)
    result = asyncio.run(run(parser.parse_args()))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
