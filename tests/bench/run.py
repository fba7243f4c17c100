"""``make bench``: whole turns through the real path, CLI start-up, throughput, parallel sessions, the embedded LLM.

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

from orchestrator.mesh.clients import ServiceClients
from servers.auth import credential_store
from tests.bench import embedded_server
from tests.bench.echo import METHOD as ECHO_METHOD
from tests.bench.http_llm import HttpLLM
from tests.bench.http_turns import STYLES, http_turns, parallel_http, run_cli, whole_process, write_style_config
from tests.bench.llm_e2e import run_embedded_llm
from tests.bench.llm_requests import llm_requests
from tests.bench.mcp_gateway import print_rows as print_mcp_rows
from tests.bench.mcp_gateway import run_mcp_bench
from tests.bench.procs import BenchMesh, machine_info
from tests.bench.service import service_bench
from tests.bench.startup import cli_startup, compile_project, first_turn
from tests.bench.throughput import generator, load
from tests.bench.turns import bench_config, parallel_sessions, percentiles, turn_overhead
from tests.support.ports import free_port
from tests.support.processes import REPO, ProcessMesh, stop_process

TARGETS = {
    "transcript_turn_p50_ms": 4.0,
    "chat_native_turn_p50_ms": 5.5,
    "overhead_over_floor_ms": 1.5,
    "cli_command_median_s": 0.35,
    "run_first_turn_s": 1.0,
    "services_only_turn_p50_ms": 1.0,
    "store_memory_rps": 3000.0,
    "evaluate_rps": 3000.0,
    "llm_mesh_cost_pct": 5.0,
    # issue 24: heists through orchestrator serve, wall time over the ideal (turns x latency), the service's memory
    "service_64_of_ideal": 1.25,
    "service_256_of_ideal": 1.5,
    "service_256_peak_rss_mb": 400.0,
    "service_failures": 0.0,
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


SECTIONS = ("real", "services", "startup", "throughput", "parallel", "service", "embedded", "server", "mcp")
"""What a run measures; ``--only`` picks some (all by default)."""


def sizes_for(smoke: bool) -> dict[str, int]:
    """How much of everything: ``--smoke`` only proves the code works (CI), the full run measures."""
    return {
        "rtt_calls": 300 if smoke else 3000,
        "http_turns": 40 if smoke else 1000,
        "llm_request_samples": 20 if smoke else 300,
        "http_warmup_turns": 10 if smoke else 100,
        "cli_short_turns": 2 if smoke else 20,
        "cli_long_turns": 6 if smoke else 220,
        "cli_repeats": 1 if smoke else 3,
        "startup_repeats": 1 if smoke else 15,
        "turns": 100 if smoke else 1500,
        "warmup_turns": 15 if smoke else 90,
        "load_s": 1.0 if smoke else 10.0,
        "parallel_turns": 12 if smoke else 150,
        "parallel_llm_delay_turns": 3 if smoke else 24,
        "http_parallel_sessions": 64,
        "http_parallel_turns": 2 if smoke else 15,
        "http_parallel_delay_ms": 200,
        # issue 24: heists of 8 turns against a 1 s model, 64 and 256 at once through the service, 64 processes
        "service_sessions": 2 if smoke else 64,
        "service_sessions_large": 0 if smoke else 256,
        "service_processes": 1 if smoke else 64,
        "service_turns": 2 if smoke else 8,
        "service_delay_ms": 100 if smoke else 1000,
        "llm_turns": 1 if smoke else 10,
        "server_turns": 2 if smoke else 8,
        "server_seeds": 1 if smoke else 4,
        "server_tokens": 8 if smoke else 64,
        "mcp_calls": 20 if smoke else 2000,
    }


def run(smoke: bool, out: Path, loadgen: str = "auto", only: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
    """Run the chosen sections and return the results (also written to ``out``)."""
    sizes = sizes_for(smoke)
    results: dict[str, Any] = {
        "mode": "smoke" if smoke else "full",
        "sections": list(only),
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
        llm = HttpLLM(record=True)
        slow_llm = HttpLLM(delay_ms=sizes["http_parallel_delay_ms"])
        try:
            mesh.start()
            echo.start()
            llm.start()
            config = bench_config(mesh.config)
            print(f"services: {', '.join(f'{n}={mesh.address(n)}' for n in mesh.ports)}; run dir {work}", flush=True)
            results["reference"] = {
                "echo_unary_round_trip": asyncio.run(unary_round_trip(echo.address, sizes["rtt_calls"]))
            }
            if "real" in only:
                print("real path: whole turns through HTTP and the openai client ...", flush=True)
                results["real_path"] = real_path(mesh, llm, sizes, work)
                results["llm_requests"] = llm_requests(llm, sizes["llm_request_samples"])
            if "services" in only:
                print("services only: in-process zero-latency LLM ...", flush=True)
                results["turn_overhead"] = asyncio.run(turn_overhead(config, sizes["turns"], sizes["warmup_turns"]))
            if "startup" in only:
                print("CLI start-up ...", flush=True)
                results["startup"] = startup(mesh, llm, sizes, work)
            if "throughput" in only:
                results["throughput"] = throughput(
                    mesh, echo, sizes, "python" if smoke and loadgen == "auto" else loadgen
                )
            if "parallel" in only:
                print("parallel sessions ...", flush=True)
                results["parallel_sessions"] = asyncio.run(
                    parallel_sessions(config, [1, 4, 16], sizes["parallel_turns"])
                ) + asyncio.run(parallel_sessions(config, [1, 4, 16], sizes["parallel_llm_delay_turns"], delay_s=0.05))
                slow_llm.start()
                results["parallel_http"] = [
                    parallel_http(mesh.config, slow_llm, style, sizes["http_parallel_sessions"],
                                  sizes["http_parallel_turns"])
                    for style in STYLES
                ]  # fmt: skip
            if "service" in only:
                print("many heists at once: orchestrator serve vs orchestrator run processes ...", flush=True)
                results["service"] = service_bench(
                    work / "service",
                    [size for size in (sizes["service_sessions"], sizes["service_sessions_large"]) if size],
                    sizes["service_processes"], sizes["service_turns"], sizes["service_delay_ms"],
                )
            if "embedded" in only:
                print("embedded LLM (our own llama.cpp server) ...", flush=True)
                results["embedded_llm"] = run_embedded_llm(mesh.config, work, sizes["llm_turns"])
            if "server" in only:
                print("the embedded model's server: one heist vs four, constrained vs free, tokens/s ...", flush=True)
                servers = ["llama-server"] if smoke else list(embedded_server.SERVERS)
                results["embedded_server"] = embedded_server.run(
                    servers, sizes["server_turns"], sizes["server_seeds"], sizes["server_tokens"], None
                )
            if "mcp" in only:
                print("MCP gateway: tools/call beside the same calls over gRPC ...", flush=True)
                results["mcp_gateway"] = run_mcp_bench(sizes["mcp_calls"])
        finally:
            slow_llm.stop()
            llm.stop()
            echo.stop()
            mesh.stop()
    results["loadavg_end"] = loadavg()
    results["verdict"] = verdict(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"\nwrote {out}")
    return results


def real_path(mesh: BenchMesh, llm: HttpLLM, sizes: dict[str, int], work: Path) -> dict[str, Any]:
    """Per style: turns through HTTP with their floor, then ``orchestrator run`` as a whole process."""
    section: dict[str, Any] = {}
    for style in STYLES:
        row = http_turns(mesh.config, llm, style, sizes["http_turns"], sizes["http_warmup_turns"])
        config_file = write_style_config(mesh.config_path, style, llm.base_url, mesh.config)
        row["whole_process"] = whole_process(
            config_file, work / "exports", sizes["cli_repeats"], sizes["cli_short_turns"], sizes["cli_long_turns"]
        )
        section[style] = row
        print(
            f"    {style}: p50 {row['total_ms']['p50_ms']} ms, floor p50 {row['floor_ms']['p50_ms']} ms, "
            f"whole process {row['whole_process']['ms_per_turn']} ms/turn",
            flush=True,
        )
    return section


def startup(mesh: BenchMesh, llm: HttpLLM, sizes: dict[str, int], work: Path) -> dict[str, Any]:
    """CLI commands' wall time and ``run``'s time to its first turn (transcript config, all services up)."""
    config_file = write_style_config(mesh.config_path, "transcript", llm.base_url, mesh.config)
    exports = work / "exports"
    compile_project()
    # A session to show and export (the real-path runs may not have run).
    run_cli(
        ["--config", str(config_file), "run", "--turns", "3", "--session-id", "bench_startup", "--out", str(exports)]
    )
    secure_dir = work / "mtls"
    secure_dir.mkdir(exist_ok=True)
    with ProcessMesh(secure_dir, llm_base_url=llm.base_url, metrics=False) as secure:
        commands = cli_startup(config_file, "bench_startup", work, sizes["startup_repeats"], secure.config_path)
    return {
        "bytecode": "project compiled before timing (python -m compileall)",
        "commands": commands,
        "run_first_turn": first_turn(config_file, llm, exports, sizes["startup_repeats"]),
    }


def throughput(mesh: BenchMesh, echo: EchoServer, sizes: dict[str, int], loadgen: str) -> dict[str, Any]:
    """64 concurrent callers per RPC against the server processes (h2load or Python generators)."""
    use = generator(loadgen)
    print(f"throughput (load generator: {use}) ...", flush=True)
    tokens = asyncio.run(tokens_for_load(mesh))
    secret = credential_store.client_secret(mesh.config, "safecracker")
    rows: dict[str, Any] = {}
    for kind, (service, spec) in KINDS.items():
        address = echo.address if service == "echo" else mesh.address(service)
        log = None if service == "echo" else mesh.log_dir / f"{service}.log"
        env = {"HEIST_BENCH_TOKEN": tokens[spec[1]] if spec else "", "HEIST_BENCH_SECRET": secret}
        rows[kind] = {
            "service": service,
            "auth": spec is not None,
            **load(address, kind, concurrency=64, duration_s=sizes["load_s"], env=env, use=use, log=log),
        }
        print(f"    {kind}: {rows[kind]['rps']} rps", flush=True)
    return rows


def _target(value: float | None, target: float, *, at_most: bool = True) -> dict[str, Any]:
    met = value is not None and (value <= target if at_most else value >= target)
    return {"value": value, "target": f"{'<=' if at_most else '>='} {target:g}", "met": met}


def verdict(results: dict[str, Any]) -> dict[str, Any]:
    """Each target of the sections that ran: the measured value and whether it is met."""
    verdicts: dict[str, Any] = {}
    real = results.get("real_path")
    if real:
        verdicts["transcript_turn_p50_ms"] = _target(
            real["transcript"]["total_ms"]["p50_ms"], TARGETS["transcript_turn_p50_ms"]
        )
        verdicts["chat_native_turn_p50_ms"] = _target(
            real["chat"]["total_ms"]["p50_ms"], TARGETS["chat_native_turn_p50_ms"]
        )
        for style in STYLES:
            verdicts[f"{style}_overhead_over_floor_ms"] = _target(
                real[style]["overhead_p50_ms"], TARGETS["overhead_over_floor_ms"]
            )
    startup_results = results.get("startup")
    if startup_results:
        slowest = max(row["median_s"] for row in startup_results["commands"].values())
        verdicts["cli_command_median_s"] = _target(slowest, TARGETS["cli_command_median_s"])
        verdicts["run_first_turn_s"] = _target(
            startup_results["run_first_turn"]["median_s"], TARGETS["run_first_turn_s"]
        )
    if "turn_overhead" in results:
        verdicts["services_only_turn_p50_ms"] = _target(
            results["turn_overhead"]["total_ms"]["p50_ms"], TARGETS["services_only_turn_p50_ms"]
        )
    if "throughput" in results:
        verdicts["store_memory_rps"] = _target(
            results["throughput"]["store_memory"]["rps"], TARGETS["store_memory_rps"], at_most=False
        )
        verdicts["evaluate_rps"] = _target(
            results["throughput"]["evaluate"]["rps"], TARGETS["evaluate_rps"], at_most=False
        )
    if "service" in results:
        rows = {row["sessions"]: row for row in results["service"]["service"]}
        for size in (64, 256):
            if size in rows:
                key = f"service_{size}_of_ideal"
                verdicts[key] = _target(rows[size]["of_ideal"], TARGETS[key])
        if 256 in rows:
            verdicts["service_256_peak_rss_mb"] = _target(rows[256]["peak_rss_mb"], TARGETS["service_256_peak_rss_mb"])
        failures = sum(row["failures"] for row in rows.values())
        verdicts["service_failures"] = _target(failures, TARGETS["service_failures"])
    if "embedded_llm" in results:
        llm = results["embedded_llm"]
        verdicts["llm_mesh_cost_pct"] = _target(llm["mesh_cost_pct"], TARGETS["llm_mesh_cost_pct"])
        verdicts["llm_mesh_time_share_pct"] = _target(llm["mesh_time_share_pct"], TARGETS["llm_mesh_cost_pct"])
    new_server = results.get("embedded_server", {}).get("llama-server")
    if new_server:
        verdicts["four_heists_over_one"] = _target(
            new_server["one_vs_four"]["four_over_one"], embedded_server.TARGETS["four_over_one"]
        )
        verdicts["constrained_tool_turn_extra_pct"] = _target(
            new_server["constrained"]["constrained_extra_pct"], embedded_server.TARGETS["constrained_extra_pct"]
        )
    return verdicts


def _row(label: str, stats: dict[str, Any], width: int = 34) -> str:
    return f"   {label:{width}s} {stats['p50_ms']:8.3f} {stats['p90_ms']:8.3f} {stats['p99_ms']:8.3f}"


def print_table(results: dict[str, Any]) -> None:
    """The results as plain-text tables."""
    machine = results["machine"]
    print(
        f"\n== heist mesh benchmarks ({results['mode']}) on {machine['cpu_model']}, {machine['cores']} cores, "
        f"Python {machine['python']}, grpcio {machine['grpcio']}; load avg {results['loadavg_start']} at start, "
        f"{results['loadavg_end']} at end"
    )
    rtt = results["reference"]["echo_unary_round_trip"]
    print(f"reference: bare grpc.aio echo round trip p50 {rtt['p50_ms']:.3f} ms, p99 {rtt['p99_ms']:.3f} ms")
    real = results.get("real_path")
    if real:
        print("\n1. whole turns through HTTP + the openai client (zero-latency endpoint, every service a process)")
        print(f"   {'':34s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s}")
        for style, row in real.items():
            name = {
                "transcript": "transcript/inline",
                "transcript_grammar": "transcript, grammar (2 requests)",
                "chat": "chat/native (2 LLM requests)",
            }[style]
            print(_row(f"{name}: turn", row["total_ms"]))
            print(_row("   of which in LLM requests", row["llm_ms"]))
            print(_row("   floor (same requests, no orchestration)", row["floor_ms"], 34))
            print(
                f"   {'   overhead over floor p50 / mean':34s} {row['overhead_p50_ms']:8.3f} "
                f"{row['overhead_mean_ms']:8.3f}   (endpoint's own cost {row['endpoint_us_per_request']} us/request)"
            )
            print(
                f"   {'   CPU per turn: turn / floor / over':34s} {row['cpu_ms_per_turn']:8.3f} "
                f"{row['floor_cpu_ms_per_turn']:8.3f} {row['overhead_cpu_ms_per_turn']:8.3f}   (this process, ms)"
            )
            whole = row["whole_process"]
            print(f"   {'   whole process, orchestrator run':34s} {whole['ms_per_turn']:8.3f} ms/turn "
                  f"((t{results['sizes']['cli_long_turns']} - t{results['sizes']['cli_short_turns']}) / "
                  f"{results['sizes']['cli_long_turns'] - results['sizes']['cli_short_turns']})")  # fmt: skip
    if "llm_requests" in results:
        print("   CPU of one chat request with tools, by client layer (event-loop thread, median):")
        for name, row in results["llm_requests"].items():
            print(f"      {name:31s} {row['median_us']:8d} us")
    if "turn_overhead" in results:
        turn = results["turn_overhead"]
        print(f"\n2. services only ({turn['turns']} turns, 1 tool call each, in-process zero-latency fake LLM object)")
        print(_row("turn total_ms", turn["total_ms"]))
        print(_row("   of which tool RPC", turn["tool_rpc_ms"]))
    startup_results = results.get("startup")
    if startup_results:
        print("\n3. CLI start-up (median wall time of a fresh process; floor: `python -c` of the libraries it needs;")
        print("   the project's bytecode compiled first, as after a user's first run or in the image)")
        print(f"   {'':41s} {'median s':>8s} {'CPU s':>7s} {'floor s':>8s} {'over s':>7s}  floor imports")
        first_turn_row = startup_results["run_first_turn"]
        rows = [(f"orchestrator {name}", row) for name, row in startup_results["commands"].items()]
        for label, row in [*rows, ("run: launch to first turn", first_turn_row)]:
            cpu = f"{row['cpu_median_s']:7.3f}" if "cpu_median_s" in row else f"{'':7s}"
            print(
                f"   {label:41s} {row['median_s']:8.3f} {cpu} {row['floor_median_s']:8.3f} "
                f"{row['over_floor_s']:7.3f}  {row['floor']}"
            )
        floors = {row["floor"]: row["floor_imports"] for _, row in [*rows, ("", first_turn_row)]}
        for floor, imports in floors.items():
            print(f"      {floor}: {imports}")
    if "throughput" in results:
        generators = {row.get("generator", "python") for row in results["throughput"].values()}
        how = {"h2load": "h2load: 4 connections x 16 streams", "python": "2 Python load-generator processes x 32"}
        print(f"\n4. throughput, 64 concurrent callers ({'; '.join(how[g] for g in sorted(generators))})")
        print(f"   {'rpc':24s} {'service':15s} {'auth':5s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} errors")
        for kind, row in results["throughput"].items():
            print(
                f"   {kind:24s} {row['service']:15s} {'yes' if row['auth'] else 'no':5s} {row['rps']:8.0f} "
                f"{row['p50_ms']:8.2f} {row['p99_ms']:8.2f} {row['errors'] or ''}"
            )
    if "service" in results:
        service = results["service"]
        print(f"\n6. many heists at once ({service['turns']} turns, model latency {service['llm_delay_ms']} ms, "
              f"ideal {service['ideal_s']} s)")  # fmt: skip
        for row in service["service"]:
            print(f"   orchestrator serve, {row['sessions']:4d} heists: {row['wall_s']:7.2f} s = {row['of_ideal']}x "
                  f"ideal, service peak RSS {row['peak_rss_mb']} MB, {row['failures']} failed")  # fmt: skip
        row = service["processes"]
        if row:
            print(f"   orchestrator run x {row['processes']:3d}:        {row['wall_s']:7.2f} s = {row['of_ideal']}x "
                  f"ideal, peak RSS {row['peak_rss_total_mb']} MB in all, {row['failures']} failed")  # fmt: skip
    if "parallel_sessions" in results:
        print("\n5. parallel sessions (one orchestrator process; in-process LLM, then HTTP with a simulated latency)")
        print(f"   {'sessions':>8s} {'LLM ms':>7s} {'turns':>6s} {'turns/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s}")
        for row in results["parallel_sessions"]:
            print(
                f"   {row['sessions']:8d} {row['llm_delay_ms']:7.0f} {row['turns']:6d} {row['turns_per_s']:8.1f} "
                f"{row['turn_p50_ms']:8.2f} {row['turn_p99_ms']:8.2f}"
            )
        for row in results["parallel_http"]:
            print(
                f"   {row['sessions']:8d} {row['llm_delay_ms']:7.0f} {row['turns']:6d} {row['turns_per_s']:8.1f} "
                f"{row['turn_p50_ms']:8.2f} {row['turn_p99_ms']:8.2f}  HTTP, {row['style']}: "
                f"{row['of_ideal_pct']}% of the ideal {row['ideal_turns_per_s']} turns/s"
            )
    if "embedded_llm" in results:
        llm = results["embedded_llm"]
        print(
            f"\n6. embedded LLM ({llm['turns']} turns, {llm['requests']} completion requests, "
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
            f"   within the turns: {llm['llm_seconds_within_turns']} s waiting for the LLM, so the mesh's share of "
            f"turn time is {llm['mesh_time_share_pct']}% (service_ms per turn {llm['service_ms_per_turn_mean']})"
        )
    if "embedded_server" in results:
        print("\n7. the embedded model's server")
        embedded_server.print_table(results["embedded_server"])
    gateway = results.get("mcp_gateway")
    if gateway:
        print(f"\nMCP gateway: {gateway['tool']} calls/s, tools/call through the gateway beside gRPC")
        print_mcp_rows(gateway)
    print("\ntargets:")
    for name, row in results["verdict"].items():
        print(f"   {name:32s} {row['value']!s:>10s} (target {row['target']}) {'met' if row['met'] else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: proves the benchmarks work (CI)")
    parser.add_argument(
        "--loadgen", choices=("auto", "h2load", "python"), default="auto",
        help="throughput load generator; auto: h2load if installed (python for --smoke)",
    )  # fmt: skip
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})",
    )
    parser.add_argument("--out", type=Path, default=Path("var/bench/results.json"), help="JSON results file")
    args = parser.parse_args(argv)
    only = tuple(name.strip() for name in args.only.split(",") if name.strip())
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))} (choose from {', '.join(SECTIONS)})")
    os.chdir(REPO)
    run(args.smoke, args.out, args.loadgen, only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
