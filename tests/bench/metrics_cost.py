"""What the Prometheus metrics cost in throughput: the same servers with and without a metrics address.

    python -m tests.bench.metrics_cost [--rounds 3] [--duration 10] [--loadgen auto|h2load|python]

Two meshes of server processes run side by side, identical but for
``metrics_address`` (the other one is idle while one is loaded). Each round
loads StoreMemory (memory, the cheapest call, so the largest relative cost)
and Evaluate (calculator, token checked) with 64 callers, on one mesh then the
other, alternating which goes first, while a scraper reads every metrics
endpoint once a second (Prometheus scrapes every 15 s; this is harsher).
Reported: requests/s per round, the median of each, and the cost
``(off - on) / off``; and, because requests/s on a shared 2-core machine move
with whatever else runs there, the server process's CPU time per call (user +
system of all its threads, from /proc, over every call the access log counted,
warm-up included), which other load disturbs much less. Tracing is off in both
(no OTEL_* variables).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from servers.auth import credential_store
from tests.bench.procs import BenchMesh, machine_info
from tests.bench.throughput import generator, load
from tests.support.access_log import access_entries
from tests.support.tokens import session_metadata

KINDS = {"store_memory": ("memory", None), "evaluate": ("calculator", ("safecracker", "calculator:use"))}
BUDGET_PCT = 5.0


def _token(mesh: BenchMesh, kind: str, use: str) -> str:
    """A token for the load generator: bound to its session for memory, with the tool scope otherwise."""
    _, spec = KINDS[kind]
    if spec is None:  # memory answers only a token bound to the caller's session, which h2load's is known
        if use != "h2load":
            raise RuntimeError("the memory load needs h2load (apt-get install nghttp2-client)")
        return dict(session_metadata(mesh.config, f"h2load_{kind}"))["authorization"].removeprefix("Bearer ")
    from servers.auth.tokens import issue_token

    return issue_token(
        credential_store.signing_key(mesh.config), issuer=mesh.config.oauth.issuer, audience=mesh.config.oauth.audience,
        client_id=spec[0], scopes=[spec[1]], ttl_s=3600,
    )  # fmt: skip


class Scraper:
    """Reads every metrics endpoint of a mesh once a second, on a thread, until stopped."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for url in self.urls:
                with urllib.request.urlopen(url, timeout=2) as response:
                    response.read()
                self.scrapes += 1


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def instrument_ns_per_call(calls: int = 200_000) -> float:
    """What the middleware's metrics do for one OK call with a token (begin, end, auth verdict), in ns.

    The same objects and calls as ``servers.runtime.middleware``: a bound method's series, then its end with a code and
    a time, and an auth verdict. Measured alone it is free of the noise other processes put on throughput.
    """
    import grpc

    from servers.runtime.metrics import ServerMetrics

    metrics = ServerMetrics("bench")
    counted = metrics.method("/heist.bench.v1.Bench/Call", False, False)
    ok, auth = grpc.StatusCode.OK, metrics.auth
    started = time.process_time()
    for _ in range(calls):
        counted.begin()
        auth.allow()
        counted.end(ok, 0.0004)
    return (time.process_time() - started) / calls * 1e9


class _Context:
    """Just enough of a servicer context for the middleware's wrapper."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def code(self) -> None:
        return None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"


def wrapper_ns_per_call(metrics: bool, calls: int = 50_000, repeats: int = 5) -> float:
    """The middleware around one call of a trivial handler, in-process, best of ``repeats`` (ns per call).

    The whole per-call path the servers run (metadata, access log, and with ``metrics`` the counts), without
    network or gRPC, so the difference on vs off is the metrics' share with nothing else in the way.
    """
    import asyncio
    import io

    import grpc

    from servers.runtime.metrics import ServerMetrics
    from servers.runtime.middleware import AccessLog, CallMiddleware

    async def behavior(request: object, context: object) -> object:
        return request

    async def measure() -> float:
        middleware = CallMiddleware(AccessLog("bench", io.StringIO()), {}, None, ServerMetrics("bench") if metrics
                                    else None)  # fmt: skip
        handler = middleware.wrapped("/heist.bench.v1.Bench/Call", grpc.unary_unary_rpc_method_handler(behavior))
        call = handler.unary_unary
        traceparent = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
        context = _Context((("x-session-id", "heist_bench"), ("traceparent", traceparent)))
        best = float("inf")
        for _ in range(repeats):
            started = time.process_time()  # CPU time: waiting for a core shared with others does not count
            for _ in range(calls):
                await call(b"", context)
            best = min(best, (time.process_time() - started) / calls * 1e9)
        return best

    return asyncio.run(measure())


def scrape_cpu_ms(scrapes: int = 50) -> float:
    """CPU time of one scrape of a server with the memory service's methods (ms), in-process."""
    from prometheus_client import generate_latest

    from heist_common.contract import contract_of
    from servers.runtime.metrics import ServerMetrics

    metrics = ServerMetrics("memory")
    contract = contract_of("memory")
    for method in contract.descriptor.methods:
        metrics.method(contract.method_path(method), False, False)
    metrics.method("/grpc.health.v1.Health/Check", False, False)
    metrics.method("/grpc.health.v1.Health/Watch", False, True)
    metrics.method("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", True, True)
    started = time.process_time()
    for _ in range(scrapes):
        generate_latest(metrics.registry)
    return (time.process_time() - started) / scrapes * 1000


def run(rounds: int, duration_s: float, loadgen: str) -> dict[str, Any]:
    """Measure; return per-kind rps of both variants and the cost."""
    use = generator(loadgen)
    results: dict[str, Any] = {"machine": machine_info(), "generator": use, "duration_s": duration_s, "rounds": []}
    results["instrument_ns_per_call"] = round(instrument_ns_per_call(), 1)
    off, on = wrapper_ns_per_call(False), wrapper_ns_per_call(True)
    results["wrapper_ns_per_call"] = {"off": round(off, 1), "on": round(on, 1)}
    results["scrape_cpu_ms"] = round(scrape_cpu_ms(), 2)
    with tempfile.TemporaryDirectory(prefix="heist-metrics-cost-") as tmp:
        for name in ("on", "off"):
            (Path(tmp) / name).mkdir()
        meshes = {
            "on": BenchMesh(Path(tmp) / "on", metrics=True),
            "off": BenchMesh(Path(tmp) / "off", metrics=False),
        }
        try:
            for mesh in meshes.values():
                mesh.start("oauth", "memory", "calculator")
            for index in range(rounds):
                order = ("on", "off") if index % 2 == 0 else ("off", "on")
                row: dict[str, dict[str, float]] = {}
                for variant in order:
                    mesh = meshes[variant]
                    urls = [mesh.metrics_url(name) for name in ("memory", "calculator")] if variant == "on" else []
                    with Scraper(urls):
                        for kind, (service, _) in KINDS.items():
                            env = {"HEIST_BENCH_TOKEN": _token(mesh, kind, use), "HEIST_BENCH_SECRET": ""}
                            log = mesh.log_dir / f"{service}.log"
                            offset, cpu = log.stat().st_size, cpu_seconds(mesh.servers[service].pid)
                            measured = load(
                                mesh.address(service), kind, concurrency=64, duration_s=duration_s, env=env, use=use,
                                log=log,
                            )  # fmt: skip
                            cpu = cpu_seconds(mesh.servers[service].pid) - cpu
                            with log.open("rb") as handle:
                                handle.seek(offset)
                                calls = len(access_entries(handle.read().decode(errors="replace")))
                            if measured["errors"]:
                                raise RuntimeError(f"{variant} {kind}: errors {measured['errors']}")
                            cpu_us = cpu / calls * 1e6
                            row.setdefault(kind, {})[variant] = measured["rps"]
                            row[kind][f"{variant}_cpu_us"] = round(cpu_us, 1)
                            print(f"round {index + 1} {variant:>3} {kind}: {measured['rps']} rps, "
                                  f"{cpu_us:.1f} us CPU per call ({calls} calls)", flush=True)  # fmt: skip
                results["rounds"].append(row)
        finally:
            for mesh in meshes.values():
                mesh.stop()
    summary = {}
    for kind in KINDS:
        on = statistics.median(row[kind]["on"] for row in results["rounds"])
        off = statistics.median(row[kind]["off"] for row in results["rounds"])
        on_cpu = statistics.median(row[kind]["on_cpu_us"] for row in results["rounds"])
        off_cpu = statistics.median(row[kind]["off_cpu_us"] for row in results["rounds"])
        summary[kind] = {
            "on_rps": on, "off_rps": off, "cost_pct": round((off - on) / off * 100.0, 2),
            "on_cpu_us": on_cpu, "off_cpu_us": off_cpu, "cpu_cost_pct": round((on_cpu - off_cpu) / off_cpu * 100.0, 2),
        }  # fmt: skip
    results["summary"] = summary
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m tests.bench.metrics_cost``."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench.metrics_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per measurement")
    parser.add_argument("--loadgen", choices=("auto", "h2load", "python"), default="auto")
    parser.add_argument("--out", type=Path, default=Path("var/bench/metrics_cost.json"))
    args = parser.parse_args(argv)
    results = run(args.rounds, args.duration, args.loadgen)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nmedian of {args.rounds} rounds; loadavg now {Path('/proc/loadavg').read_text().split()[:3]}")
    print(f"{'call':<14} {'rps off':>9} {'rps on':>9} {'cost':>8}   {'CPU/call off':>13} {'on':>9} {'cost':>8}")
    for kind, row in results["summary"].items():
        verdict = "ok" if row["cpu_cost_pct"] <= BUDGET_PCT else f"over {BUDGET_PCT:g}%"
        print(
            f"{kind:<14} {row['off_rps']:>9.1f} {row['on_rps']:>9.1f} {row['cost_pct']:>7.2f}%   "
            f"{row['off_cpu_us']:>10.1f} us {row['on_cpu_us']:>6.1f} us {row['cpu_cost_pct']:>7.2f}%  {verdict}"
        )
    micro = results["instrument_ns_per_call"]
    share = micro / 1000 / results["summary"]["store_memory"]["off_cpu_us"] * 100
    print(f"the metrics' own work per call, measured alone: {micro:.0f} ns ({share:.2f}% of a StoreMemory's CPU)")
    wrapper = results["wrapper_ns_per_call"]
    extra = (wrapper["on"] - wrapper["off"]) / 1000 / results["summary"]["store_memory"]["off_cpu_us"] * 100
    print(f"the middleware per call, in-process: {wrapper['off']:.0f} ns off, {wrapper['on']:.0f} ns on "
          f"(+{wrapper['on'] - wrapper['off']:.0f} ns, {extra:.2f}% of a StoreMemory's CPU)")  # fmt: skip
    scrape = results["scrape_cpu_ms"]
    print(f"one scrape: {scrape:.2f} ms of CPU (every 15 s: {scrape / 150:.3f}% of a core)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
