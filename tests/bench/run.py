"""``make bench``: per-turn mesh overhead, service throughput, parallel sessions and the embedded LLM.

    python -m tests.bench.run [--smoke] --out var/bench/results.json

Every gRPC service runs as its own process on a free 127.0.0.1 port (as
``make serve`` runs them), with a run folder in a temp directory; load
generators and the llama.cpp server are processes too. Everything started is
stopped at the end, also after a failure. The terminal gets a table, ``--out``
the JSON (with the machine it ran on). Targets are reported, never asserted:
on a shared 2-core machine, timings are measurements, not pass/fail tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from orchestrator.clients import ServiceClients
from servers import credentials
from tests.bench.echo import METHOD as ECHO_METHOD
from tests.bench.llm_e2e import run_embedded_llm
from tests.bench.procs import BenchMesh, machine_info
from tests.bench.throughput import generator, load
from tests.bench.turns import bench_config, parallel_sessions, percentiles, turn_overhead
from tests.support.ports import free_port
from tests.support.processes import REPO, stop_process

TARGETS = {
    "turn_p50_ms": 1.0,
    "store_memory_rps": 3000.0,
    "evaluate_rps": 3000.0,
    "llm_mesh_cost_pct": 5.0,
}
MEMORY_SCOPES = "memory:read memory:write memory:admin"
"""The load generators use many sessions with one token: the admin scope may touch any session."""
KINDS = {
    # kind: (service, OAuth client and space-separated scopes for methods that need a token)
    "echo": ("echo", None),
    "store_memory": ("memory", ("admin", MEMORY_SCOPES)),
    "get_compressed_memory": ("memory", ("admin", MEMORY_SCOPES)),
    "evaluate": ("calculator", ("safecracker", "calculator:use")),
    "read_file": ("file_reader", ("hacker", "file_reader:use")),
    "query": ("database_query", ("mole", "database_query:use")),
    "issue_token": ("oauth", None),
}


class EchoServer:
    """The bare grpc.aio echo server as a process (the reference point)."""

    def __init__(self) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> EchoServer:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.echo", "--address", self.address],
            cwd=REPO, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != b"READY":
            raise RuntimeError("echo server did not start")
        return self

    def stop(self) -> None:
        stop_process(self.process, grace_s=5)


async def unary_round_trip(address: str, calls: int) -> dict[str, Any]:
    """Sequential echo calls from this process: the floor of one grpc.aio unary round trip here."""
    async with grpc.aio.insecure_channel(address) as channel:
        echo = channel.unary_unary(ECHO_METHOD)
        payload = b"x" * 64
        for _ in range(min(300, calls)):
            await echo(payload, timeout=5)
        samples = []
        for _ in range(calls):
            started = time.perf_counter()
            await echo(payload, timeout=5)
            samples.append((time.perf_counter() - started) * 1000.0)
    return percentiles(samples)


async def tokens_for_load(mesh: BenchMesh) -> dict[str, str]:
    """One bearer token per tool scope, issued by the OAuth server process."""
    client = ServiceClients(mesh.config)
    try:
        return {
            scopes: await client.tokens.token(oauth_client, scopes.split(), ())
            for oauth_client, scopes in (spec for _, spec in KINDS.values() if spec is not None)
        }
    finally:
        await client.close()


def loadavg() -> list[float]:
    """1/5/15-minute load averages (other work on the machine skews every number)."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def run(smoke: bool, out: Path, loadgen: str = "auto") -> dict[str, Any]:
    """Run all four parts and return the results (also written to ``out``)."""
    sizes = {
        "rtt_calls": 300 if smoke else 3000,
        "turns": 100 if smoke else 1500,
        "warmup_turns": 15 if smoke else 90,
        "load_s": 1.0 if smoke else 10.0,
        "parallel_turns": 12 if smoke else 150,
        "parallel_llm_delay_turns": 3 if smoke else 24,
        "llm_turns": 1 if smoke else 10,
    }
    results: dict[str, Any] = {
        "mode": "smoke" if smoke else "full",
        "machine": machine_info(),
        "loadavg_start": loadavg(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sizes": sizes,
        "targets": TARGETS,
    }
    with tempfile.TemporaryDirectory(prefix="heist-bench-") as tmp:
        work = Path(tmp)
        mesh = BenchMesh(work)
        echo = EchoServer()
        try:
            mesh.start()
            echo.start()
            config = bench_config(mesh.config)
            print(f"services: {', '.join(f'{n}={mesh.address(n)}' for n in mesh.ports)}; run dir {work}", flush=True)

            results["reference"] = {
                "echo_unary_round_trip": asyncio.run(unary_round_trip(echo.address, sizes["rtt_calls"]))
            }
            print("1/4 per-turn overhead ...", flush=True)
            results["turn_overhead"] = asyncio.run(turn_overhead(config, sizes["turns"], sizes["warmup_turns"]))

            use = generator("python" if smoke and loadgen == "auto" else loadgen)
            print(f"2/4 throughput (load generator: {use}) ...", flush=True)
            tokens = asyncio.run(tokens_for_load(mesh))
            secret = credentials.client_secret(mesh.config, "safecracker")
            throughput: dict[str, Any] = {}
            for kind, (service, spec) in KINDS.items():
                address = echo.address if service == "echo" else mesh.address(service)
                log = None if service == "echo" else mesh.log_dir / f"{service}.log"
                env = {"HEIST_BENCH_TOKEN": tokens[spec[1]] if spec else "", "HEIST_BENCH_SECRET": secret}
                throughput[kind] = {
                    "service": service,
                    "auth": spec is not None,
                    **load(address, kind, concurrency=64, duration_s=sizes["load_s"], env=env, use=use, log=log),
                }
                print(f"    {kind}: {throughput[kind]['rps']} rps", flush=True)
            results["throughput"] = throughput

            print("3/4 parallel sessions ...", flush=True)
            results["parallel_sessions"] = asyncio.run(
                parallel_sessions(config, [1, 4, 16], sizes["parallel_turns"])
            ) + asyncio.run(parallel_sessions(config, [1, 4, 16], sizes["parallel_llm_delay_turns"], delay_s=0.05))

            print("4/4 embedded LLM (our own llama.cpp server) ...", flush=True)
            results["embedded_llm"] = run_embedded_llm(mesh.config, work, sizes["llm_turns"])
        finally:
            echo.stop()
            mesh.stop()
    results["loadavg_end"] = loadavg()
    results["verdict"] = verdict(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"\nwrote {out}")
    return results


def verdict(results: dict[str, Any]) -> dict[str, Any]:
    """Each target: the measured value and whether it is met."""
    turn = results["turn_overhead"]["total_ms"]["p50_ms"]
    store = results["throughput"]["store_memory"]["rps"]
    evaluate = results["throughput"]["evaluate"]["rps"]
    cost = results["embedded_llm"]["mesh_cost_pct"]
    share = results["embedded_llm"]["mesh_time_share_pct"]
    return {
        "turn_p50_ms": {"value": turn, "target": f"<= {TARGETS['turn_p50_ms']}", "met": turn <= TARGETS["turn_p50_ms"]},
        "store_memory_rps": {"value": store, "target": f">= {TARGETS['store_memory_rps']:.0f}",
                             "met": store >= TARGETS["store_memory_rps"]},
        "evaluate_rps": {"value": evaluate, "target": f">= {TARGETS['evaluate_rps']:.0f}",
                         "met": evaluate >= TARGETS["evaluate_rps"]},
        "llm_mesh_cost_pct": {"value": cost, "target": f"< {TARGETS['llm_mesh_cost_pct']}",
                              "met": cost is not None and cost < TARGETS["llm_mesh_cost_pct"]},
        "llm_mesh_time_share_pct": {"value": share, "target": f"< {TARGETS['llm_mesh_cost_pct']}",
                                    "met": share is not None and share < TARGETS["llm_mesh_cost_pct"]},
    }  # fmt: skip


def print_table(results: dict[str, Any]) -> None:
    """The results as plain-text tables."""
    machine = results["machine"]
    print(
        f"\n== heist mesh benchmarks ({results['mode']}) on {machine['cpu_model']}, {machine['cores']} cores, "
        f"Python {machine['python']}, grpcio {machine['grpcio']}; load avg {results['loadavg_start']}"
    )
    rtt = results["reference"]["echo_unary_round_trip"]
    print(f"reference: bare grpc.aio echo round trip p50 {rtt['p50_ms']:.3f} ms, p99 {rtt['p99_ms']:.3f} ms")
    turn = results["turn_overhead"]
    print(f"\n1. per-turn overhead ({turn['turns']} turns, 1 tool call each, in-process zero-latency LLM)")
    print(f"   {'':24s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s}")
    for label, key in (
        ("turn total_ms", "total_ms"),
        ("turn service_ms", "service_ms"),
        ("  of which tool RPC", "tool_rpc_ms"),
    ):
        row = turn[key]
        print(f"   {label:24s} {row['p50_ms']:8.3f} {row['p90_ms']:8.3f} {row['p99_ms']:8.3f}")
    for tool, row in turn["by_tool_total_ms"].items():
        print(f"   {'total, ' + tool:24s} {row['p50_ms']:8.3f} {row['p90_ms']:8.3f} {row['p99_ms']:8.3f}")
    generators = {row.get("generator", "python") for row in results["throughput"].values()}
    how = {"h2load": "h2load: 4 connections x 16 streams", "python": "2 Python load-generator processes x 32"}
    print(f"\n2. throughput, 64 concurrent callers ({'; '.join(how[g] for g in sorted(generators))})")
    print(f"   {'rpc':24s} {'service':15s} {'auth':5s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} errors")
    for kind, row in results["throughput"].items():
        print(
            f"   {kind:24s} {row['service']:15s} {'yes' if row['auth'] else 'no':5s} {row['rps']:8.0f} "
            f"{row['p50_ms']:8.2f} {row['p99_ms']:8.2f} {row['errors'] or ''}"
        )
    print("\n3. parallel sessions (one orchestrator process, in-process LLM)")
    print(f"   {'sessions':>8s} {'LLM ms':>7s} {'turns':>6s} {'turns/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for row in results["parallel_sessions"]:
        print(
            f"   {row['sessions']:8d} {row['llm_delay_ms']:7.0f} {row['turns']:6d} {row['turns_per_s']:8.1f} "
            f"{row['turn_p50_ms']:8.2f} {row['turn_p99_ms']:8.2f}"
        )
    llm = results["embedded_llm"]
    print(
        f"\n4. embedded LLM ({llm['turns']} turns, {llm['requests']} completion requests, "
        f"{llm['tool_calls']} tool calls)"
    )
    print(
        f"   endpoint alone: {llm['endpoint_tokens']} tokens in {llm['endpoint_seconds']} s = "
        f"{llm['endpoint_tokens_per_s']} tokens/s"
    )
    print(
        f"   end to end:     {llm['end_to_end_tokens']} tokens in {llm['end_to_end_seconds']} s = "
        f"{llm['end_to_end_tokens_per_s']} tokens/s  -> mesh cost {llm['mesh_cost_pct']}%"
    )
    print(
        f"   within the turns: {llm['llm_seconds_within_turns']} s waiting for the LLM, so the mesh's share of turn "
        f"time is {llm['mesh_time_share_pct']}% (service_ms per turn {llm['service_ms_per_turn_mean']})"
    )
    print("\ntargets:")
    for name, row in results["verdict"].items():
        print(f"   {name:20s} {row['value']!s:>10s} (target {row['target']}) {'met' if row['met'] else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: proves the benchmarks work (CI)")
    parser.add_argument(
        "--loadgen", choices=("auto", "h2load", "python"), default="auto",
        help="throughput load generator; auto: h2load if installed (python for --smoke)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("var/bench/results.json"), help="JSON results file")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    run(args.smoke, args.out, args.loadgen)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
