"""Data-plane costs in one run: mTLS versus plaintext, one versus two calculator replicas.

    python -m tests.bench.mesh_transport [--smoke] --out var/bench/mesh.json

Each configuration is a fresh ``BenchMesh`` (every service its own process, as
``make serve`` runs them) and is measured the same way, back to back, so the
rows compare: per-turn cost (one tool call per turn, the in-process instant
LLM) and Evaluate throughput through the orchestrator's own ``ServiceClients``
channel (round_robin over the replicas when there are two) with a closed loop
of concurrent callers in this process. On 2 shared cores the load generator,
the orchestrator side and every replica compete for the same CPUs, so the
replica rows say what 2 cores allow, not what replicas scale to.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from heist.calculator.v1 import calculator_pb2, calculator_pb2_grpc

from orchestrator.mesh.clients import ServiceClients, session_metadata
from tests.bench.procs import BenchMesh, machine_info
from tests.bench.turns import bench_config, percentiles, turn_overhead
from tests.support.access_log import calls

CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "plaintext, 1 replica": {"transport": "plaintext"},
    "mtls, 1 replica": {"transport": "mtls"},
    "mtls, 2 calculator replicas": {"transport": "mtls", "replicas": {"calculator": 2}},
}


async def evaluate_load(config: Any, concurrency: int, duration_s: float) -> dict[str, Any]:
    """Closed-loop Evaluate calls through ServiceClients' guarded channel for ``duration_s``; req/s and latency."""
    clients = ServiceClients(config)
    try:
        metadata = session_metadata("bench_transport")
        token = await clients.tokens.token("safecracker", ["calculator:use"], metadata)
        stub = calculator_pb2_grpc.CalculatorServiceStub(clients.services["calculator"].channel)
        request = calculator_pb2.EvaluateRequest(expression="(120-15)*3")
        authorized = (*metadata, ("authorization", f"Bearer {token}"))
        for _ in range(50):  # connect every replica and warm up
            await stub.Evaluate(request, metadata=authorized, timeout=5)
        samples: list[float] = []
        errors: dict[str, int] = {}
        stop_at = time.perf_counter() + duration_s

        async def caller() -> None:
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                try:
                    await stub.Evaluate(request, metadata=authorized, timeout=5)
                except Exception as exc:  # counted, never hidden
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                samples.append((time.perf_counter() - started) * 1000.0)

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        wall_s = time.perf_counter() - started
    finally:
        await clients.close()
    stats = percentiles(samples)
    return {"concurrency": concurrency, "requests": len(samples), "rps": round(len(samples) / wall_s, 1),
            "p50_ms": stats["p50_ms"], "p99_ms": stats["p99_ms"], "errors": errors}  # fmt: skip


def measure(name: str, sections: dict[str, Any], work: Path, sizes: dict[str, Any]) -> dict[str, Any]:
    """One configuration on a fresh mesh: turn cost, then Evaluate throughput, then how calls were spread."""
    folder = work / name.replace(",", "").replace(" ", "_")
    folder.mkdir(parents=True)
    mesh = BenchMesh(folder, **sections)
    try:
        mesh.start()
        config = bench_config(mesh.config)
        turns = asyncio.run(turn_overhead(config, sizes["turns"], sizes["warmup_turns"]))
        load = asyncio.run(evaluate_load(config, sizes["concurrency"], sizes["load_s"]))
    finally:
        mesh.stop()
    per_replica = [len(calls(replica.log(), "Evaluate", "OK")) for replica in mesh.replicas["calculator"]]
    return {
        "configuration": name,
        "transport": mesh.config.security.transport,
        "calculator_replicas": len(per_replica),
        "turn_p50_ms": turns["total_ms"]["p50_ms"],
        "turn_p99_ms": turns["total_ms"]["p99_ms"],
        "tool_rpc_p50_ms": turns["tool_rpc_ms"]["p50_ms"],
        "evaluate": load,
        "evaluate_calls_per_replica": per_replica,
    }


def _loadavg() -> str:
    """The 1/5/15-minute load average at the start (other work on the machine skews every number)."""
    return Path("/proc/loadavg").read_text().rsplit(" ", 2)[0] if Path("/proc/loadavg").exists() else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes (proves the code runs)")
    parser.add_argument("--out", type=Path, default=Path("var/bench/mesh.json"))
    parser.add_argument("--rounds", type=int, default=2, help="rounds, every other one in reverse order (drift)")
    args = parser.parse_args()
    sizes = {"turns": 60, "warmup_turns": 10, "concurrency": 16, "load_s": 1.0} if args.smoke else {
        "turns": 600, "warmup_turns": 60, "concurrency": 64, "load_s": 8.0}  # fmt: skip
    results: dict[str, Any] = {"machine": machine_info(), "loadavg": _loadavg(), "sizes": sizes, "rows": []}
    with tempfile.TemporaryDirectory(prefix="heist-bench-mesh-") as tmp:
        order = list(CONFIGURATIONS.items())
        schedule = [item for rnd in range(max(1, args.rounds)) for item in (order if rnd % 2 == 0 else order[::-1])]
        for index, (name, sections) in enumerate(schedule):
            row = measure(name, sections, Path(tmp) / str(index), sizes)
            results["rows"].append(row)
            load = row["evaluate"]
            print(f"{name:<30} turn p50 {row['turn_p50_ms']:6.2f} ms  p99 {row['turn_p99_ms']:6.2f} ms  "
                  f"tool rpc p50 {row['tool_rpc_p50_ms']:5.2f} ms  Evaluate {load['rps']:7.1f} req/s "
                  f"p99 {load['p99_ms']:6.1f} ms  errors {load['errors'] or 0}  per replica "
                  f"{row['evaluate_calls_per_replica']}", flush=True)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
