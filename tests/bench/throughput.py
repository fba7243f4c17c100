"""Service throughput: 64 concurrent callers (two load-generator processes of 32) per RPC, against server processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from tests.bench.procs import REPO
from tests.bench.turns import percentiles

LOAD_PROCESSES = 2


def load(address: str, kind: str, *, concurrency: int, duration_s: float, env: dict[str, str]) -> dict[str, Any]:
    """Run ``LOAD_PROCESSES`` generators against ``address`` at once; aggregate requests/s and latency."""
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
        "concurrency": per_process * LOAD_PROCESSES,
        "duration_s": duration_s,
    }
