"""Service throughput: 64 concurrent callers per RPC against server processes.

The load comes from h2load when it is installed (``tests/bench/h2load.py``:
native, so the server gets the CPU) and otherwise from two Python
load-generator processes of 32 callers each (``tests/bench/load.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.bench import h2load
from tests.bench.turns import percentiles
from tests.support.processes import REPO

LOAD_PROCESSES = 2


def generator(requested: str) -> str:
    """The load generator to use: ``h2load`` or ``python``; ``auto`` is h2load when installed."""
    if requested == "auto":
        return "h2load" if h2load.available() else "python"
    if requested == "h2load" and not h2load.available():
        raise RuntimeError("h2load is not installed (apt-get install nghttp2-client)")
    return requested


def load(
    address: str,
    kind: str,
    *,
    concurrency: int,
    duration_s: float,
    env: dict[str, str],
    use: str = "python",
    log: Path | None = None,
) -> dict[str, Any]:
    """Load ``address`` with ``concurrency`` callers of ``kind`` for ``duration_s``; requests/s and latency.

    ``log`` is the server's access log, in which h2load runs check every call's gRPC status.
    """
    if use == "h2load":
        if concurrency != h2load.CONNECTIONS * h2load.STREAMS_PER_CONNECTION:
            raise ValueError(f"h2load runs {h2load.CONNECTIONS} x {h2load.STREAMS_PER_CONNECTION} callers")
        return h2load.load(
            address, kind, duration_s=duration_s, token=env.get("HEIST_BENCH_TOKEN", ""),
            secret=env.get("HEIST_BENCH_SECRET", ""), server_log=log,
        )  # fmt: skip
    return python_load(address, kind, concurrency=concurrency, duration_s=duration_s, env=env)


def python_load(address: str, kind: str, *, concurrency: int, duration_s: float, env: dict[str, str]) -> dict[str, Any]:
    """Run ``LOAD_PROCESSES`` Python generators against ``address`` at once; aggregate requests/s and latency."""
    per_process = max(1, concurrency // LOAD_PROCESSES)
    start_at = time.time() + 2.0  # time to start Python, connect and warm up
    command = [
        sys.executable,
        "-m",
        "tests.bench.load",
        "--address",
        address,
        "--kind",
        kind,
        "--concurrency",
        str(per_process),
        "--duration",
        str(duration_s),
        "--start-at",
        str(start_at),
    ]
    children = [
        subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env})
        for _ in range(LOAD_PROCESSES)
    ]
    results = []
    try:
        for child in children:
            out, err = child.communicate(timeout=duration_s + 60)
            if child.returncode != 0:
                raise RuntimeError(f"load generator for {kind} failed:\n{err.decode(errors='replace')[-2000:]}")
            results.append(json.loads(out))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    latencies = [latency for result in results for latency in result["latencies_ms"]]
    errors: dict[str, int] = {}
    for result in results:
        for code, count in result["errors"].items():
            errors[code] = errors.get(code, 0) + count
    if not latencies:
        raise RuntimeError(f"{kind}: no successful call ({errors})")
    stats = percentiles(latencies)
    return {
        "rps": round(sum(r["count"] / r["elapsed_s"] for r in results), 1),
        "requests": len(latencies),
        "errors": errors,
        "p50_ms": stats["p50_ms"],
        "p99_ms": stats["p99_ms"],
        "mean_ms": stats["mean_ms"],
        "concurrency": per_process * LOAD_PROCESSES,
        "duration_s": duration_s,
        "generator": "python",
        "grpc_status_checked_by": "client",
    }
