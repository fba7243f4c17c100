"""Tool calls per second through the MCP gateway, beside the same calls over gRPC (``make bench``, section ``mcp``).

    python -m tests.bench.mcp_gateway [--calls N] [--out var/bench/mcp.json]

The mesh and the gateway run as ``make serve`` runs them (the supervisor, every process on a free port,
mTLS, a temporary run folder). The same Evaluate call is made ``calls`` times with 1 and with 8 calls in
flight: over gRPC with the client's own token (the reference), and through the gateway with the ``mcp``
SDK's Streamable HTTP client (8 in flight: 8 MCP sessions of the same OAuth client). Each run is bounded by
``MAX_SECONDS`` as well as by its count; everything started is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2
import yaml
from heist.calculator.v1 import calculator_pb2, calculator_pb2_grpc
from heist.oauth.v1 import oauth_pb2, oauth_pb2_grpc
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from heist_common import tls
from heist_common.config import HeistConfig, load_config
from heist_common.credentials import client_secret
from tests.support.config import heist_config
from tests.support.ports import free_ports
from tests.support.processes import REPO

CLIENT = "crew"
EXPRESSION = "(17 + 25) * 3"
CONCURRENCY = (1, 8)
MAX_SECONDS = 60.0
"""No run takes longer than this, whatever ``calls`` says."""


def serve(work: Path) -> Path:
    """Write a config with the gateway on free ports and start everything with the supervisor."""
    data = heist_config(work)
    names = list(data["services"])
    ports = free_ports(len(names) + 1)
    for name, port in zip(names, ports, strict=False):
        data["services"][name]["address"] = f"127.0.0.1:{port}"
    data["oauth"]["clients"] = {
        **data["oauth"]["clients"], "mcp_gateway": ["calculator:use", "file_reader:use", "database_query:use"]
    }  # fmt: skip
    data["mcp_gateway"] = {
        "address": f"127.0.0.1:{ports[-1]}", "calls_per_second": 10_000.0, "burst": 10_000,
        "max_concurrent_calls": 64, "max_concurrent_per_client": 64,
    }  # fmt: skip
    path = work / "heist.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    started = subprocess.run(
        [sys.executable, "-m", "servers.supervisor", "serve", "--config", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if started.returncode != 0:
        raise RuntimeError(f"serve failed: {started.stdout}{started.stderr}")
    return path


def stop(path: Path) -> None:
    """Stop what ``serve`` started."""
    subprocess.run([sys.executable, "-m", "servers.supervisor", "stop", "--config", str(path)], cwd=REPO,
                   capture_output=True, timeout=60)  # fmt: skip


def token(config: HeistConfig) -> str:
    """A token for ``CLIENT`` from the OAuth service (client credentials)."""
    with tls.sync_channel(config, config.service("oauth").address, service="oauth", identity="grpcurl") as channel:
        request = oauth_pb2.IssueTokenRequest(
            grant_type="client_credentials", client_id=CLIENT, client_secret=client_secret(config, CLIENT)
        )
        return str(oauth_pb2_grpc.OAuthServiceStub(channel).IssueToken(request, timeout=5).access_token)


async def _workers(calls: int, concurrency: int, call: Any) -> dict[str, Any]:
    """Make ``calls`` calls with ``concurrency`` workers, ``call(worker)`` each; calls/s and failures."""
    deadline = time.monotonic() + MAX_SECONDS
    remaining = [calls]
    failures = [0]

    async def worker(index: int) -> None:
        while remaining[0] > 0 and time.monotonic() < deadline:
            remaining[0] -= 1
            if not await call(index):
                failures[0] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(index) for index in range(concurrency)))
    seconds = time.perf_counter() - started
    made = calls - max(remaining[0], 0)
    return {"calls": made, "failures": failures[0], "seconds": round(seconds, 3),
            "calls_per_s": round(made / seconds, 1) if seconds else None}  # fmt: skip


async def over_grpc(config: HeistConfig, bearer: str, calls: int, concurrency: int) -> dict[str, Any]:
    """The reference: Evaluate over one mTLS channel with the client's token."""
    metadata = (("authorization", f"Bearer {bearer}"),)
    address = config.service("calculator").address
    async with tls.aio_channel(config, address, service="calculator", identity="grpcurl") as channel:
        stub = calculator_pb2_grpc.CalculatorServiceStub(channel)
        request = calculator_pb2.EvaluateRequest(expression=EXPRESSION)

        async def call(_: int) -> bool:
            response = await stub.Evaluate(request, metadata=metadata, timeout=5)
            return bool(response.value == 126)

        await _workers(min(calls, 50), concurrency, call)  # warm-up
        return await _workers(calls, concurrency, call)


async def over_mcp(config: HeistConfig, bearer: str, calls: int, concurrency: int) -> dict[str, Any]:
    """The same call as ``tools/call`` through the gateway, one MCP session per worker."""
    assert config.mcp_gateway is not None
    url = f"https://{config.mcp_gateway.address}/mcp"
    verify = ssl.create_default_context(cafile=tls.tls_dir(config) / "ca.crt")
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(
            httpx2.AsyncClient(headers={"Authorization": f"Bearer {bearer}"}, verify=verify, timeout=30)
        )
        sessions: list[ClientSession] = []
        for _ in range(concurrency):
            read, write = await stack.enter_async_context(streamable_http_client(url, http_client=http))
            session = await stack.enter_async_context(ClientSession(read, write))
            await session.initialize()
            sessions.append(session)

        async def call(worker: int) -> bool:
            result = await sessions[worker].call_tool("calculator_evaluate", {"expression": EXPRESSION})
            return not result.is_error

        await _workers(min(calls, 50), concurrency, call)  # warm-up
        return await _workers(calls, concurrency, call)


def run_mcp_bench(calls: int) -> dict[str, Any]:
    """Serve a mesh with the gateway, measure both paths at each concurrency, stop it."""
    with tempfile.TemporaryDirectory(prefix="heist-bench-mcp-") as tmp:
        path = serve(Path(tmp))
        try:
            config = load_config(path)
            bearer = token(config)
            rows = []
            for concurrency in CONCURRENCY:
                grpc_row = asyncio.run(over_grpc(config, bearer, calls, concurrency))
                mcp_row = asyncio.run(over_mcp(config, bearer, calls, concurrency))
                rows.append({"concurrency": concurrency, "grpc": grpc_row, "mcp": mcp_row})
            return {"tool": "calculator_evaluate", "expression": EXPRESSION, "rows": rows}
        finally:
            stop(path)


def print_rows(result: dict[str, Any]) -> None:
    """The comparison as a plain-text table."""
    print(f"   {'in flight':>9s} {'gRPC calls/s':>13s} {'MCP calls/s':>12s} {'MCP / gRPC':>11s}")
    for row in result["rows"]:
        grpc_rate, mcp_rate = row["grpc"]["calls_per_s"], row["mcp"]["calls_per_s"]
        ratio = f"{mcp_rate / grpc_rate:.2f}" if grpc_rate and mcp_rate else "-"
        print(f"   {row['concurrency']:>9d} {grpc_rate!s:>13s} {mcp_rate!s:>12s} {ratio:>11s}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m tests.bench.mcp_gateway``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=2000, help="calls per path and concurrency (default 2000)")
    parser.add_argument("--out", type=Path, default=Path("var/bench/mcp.json"))
    args = parser.parse_args(argv)
    result = run_mcp_bench(max(1, min(args.calls, 100_000)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_rows(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
