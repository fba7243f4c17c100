"""Many heists at once: through ``orchestrator serve`` (A2A over gRPC) beside as many ``orchestrator run`` processes.

    python -m tests.bench.service [--sizes 64,256] [--processes 64] [--turns 8] [--delay-ms 1000]

Heists of ``--turns`` turns against the scripted HTTP model endpoint
(``tests.bench.http_llm``) with ``--delay-ms`` latency per completion and one
completion per turn (transcript style), so a heist's ideal wall time is
turns x latency. Every service, the orchestrator service and the endpoint run
as processes on free ports. Reported per run: wall time of the whole batch
(first request to last final state) over the ideal, the service's peak
resident memory (sampled from /proc), failures (tasks that did not complete,
processes that did not exit 0). Part of ``make bench`` (section ``service``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from a2a.types import a2a_pb2

from heist_common.config import HeistConfig
from tests.bench.http_llm import HttpLLM
from tests.bench.http_turns import STYLES
from tests.support.a2a import a2a_client, bearer, heist_request, oauth_token
from tests.support.processes import REPO, ProcessMesh

TERMINAL = {a2a_pb2.TASK_STATE_COMPLETED, a2a_pb2.TASK_STATE_FAILED, a2a_pb2.TASK_STATE_CANCELED}
HEIST_TIMEOUT_S = 600.0
"""No batch waits longer than this for its last heist (a failure, not a hang)."""
SAMPLE_S = 0.1


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes (their own, not their children's)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def rss_mb(pid: int) -> float:
    """Resident memory of one process now, in MB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


class PeakRss:
    """The largest sum of the resident memory of ``pids()`` seen while running (sampled every ``SAMPLE_S``)."""

    def __init__(self, pids: Any) -> None:
        self._pids = pids
        self.peak_mb = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak_mb = max(self.peak_mb, sum(rss_mb(pid) for pid in self._pids()))
            await asyncio.sleep(SAMPLE_S)

    def __enter__(self) -> PeakRss:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def through_service(
    config: HeistConfig, address: str, pid: int, mesh_pids: list[int], sessions: int, turns: int
) -> dict[str, Any]:
    """``sessions`` heists at once through the service, each streamed to its end by the a2a-sdk's client."""
    token = oauth_token(config, "alice")
    cpu_before, mesh_before, client_before = cpu_s([pid]), cpu_s(mesh_pids), time.process_time()
    states: list[str] = []
    async with a2a_client(config, address) as client:

        async def heist() -> str:
            final = "no final state"
            stream = client.send_message(heist_request(turns=turns), context=bearer(token, HEIST_TIMEOUT_S))
            async for event in stream:
                if event.HasField("status_update") and event.status_update.status.state in TERMINAL:
                    final = a2a_pb2.TaskState.Name(event.status_update.status.state)
            return final

        with PeakRss(lambda: [pid]) as rss:
            started = time.monotonic()
            outcomes = await asyncio.gather(*(heist() for _ in range(sessions)), return_exceptions=True)
            wall = time.monotonic() - started
    for outcome in outcomes:
        states.append(outcome if isinstance(outcome, str) else f"{type(outcome).__name__}: {outcome}"[:200])
    failures = [state for state in states if state != "TASK_STATE_COMPLETED"]
    return {"sessions": sessions, "wall_s": round(wall, 2), "peak_rss_mb": round(rss.peak_mb, 1),
            "failures": len(failures), "failure_kinds": sorted(set(failures))[:5],
            "service_cpu_s": round(cpu_s([pid]) - cpu_before, 1),
            "mesh_cpu_s": round(cpu_s(mesh_pids) - mesh_before, 1),
            "client_cpu_s": round(time.process_time() - client_before, 1)}  # fmt: skip


async def as_processes(config_path: Path, out_dir: Path, processes: int, turns: int) -> dict[str, Any]:
    """``processes`` ``orchestrator run`` processes started at once on the same audit database."""
    command = [str(Path(sys.executable).parent / "orchestrator"), "--config", str(config_path), "run",
               "--turns", str(turns), "--out", str(out_dir)]  # fmt: skip
    started = time.monotonic()
    children = [
        await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.DEVNULL,
                                             stderr=asyncio.subprocess.PIPE, cwd=REPO)
        for _ in range(processes)
    ]  # fmt: skip
    with PeakRss(lambda: [child.pid for child in children if child.returncode is None]) as rss:
        errors = await asyncio.wait_for(asyncio.gather(*(child.communicate() for child in children)), HEIST_TIMEOUT_S)
        wall = time.monotonic() - started
    failed = [(child.returncode, err.decode(errors="replace").strip().splitlines()[-1:])
              for child, (_, err) in zip(children, errors, strict=True) if child.returncode != 0]  # fmt: skip
    return {"processes": processes, "wall_s": round(wall, 2), "peak_rss_total_mb": round(rss.peak_mb, 1),
            "failures": len(failed), "failure_kinds": sorted({str(f) for f in failed})[:5]}  # fmt: skip


def floor(row: dict[str, Any], llm: HttpLLM, heists: int, delay_ms: int) -> None:
    """Add the batch's floor: a heist's completions one after another, each ``delay_ms`` (nothing can be faster).

    Why beside the ideal: the crew asks more than one completion in some turns (a
    resample when a reply repeats an earlier one, which this endpoint's short
    replies do), so the floor is above turns x latency.
    """
    completions = int(llm.stats()["completions"])
    row["completions_per_heist"] = round(completions / heists, 2)
    floor_s = completions / heists * delay_ms / 1000.0
    row["floor_s"] = round(floor_s, 2)
    row["of_floor"] = round(row["wall_s"] / floor_s, 2) if floor_s else None


def service_bench(
    work: Path, sizes: list[int], processes: int, turns: int, delay_ms: int, export: bool = True
) -> dict[str, Any]:
    """Run both ways against one mesh; results with their ideal and ratio."""
    ideal_s = turns * delay_ms / 1000.0
    results: dict[str, Any] = {"turns": turns, "llm_delay_ms": delay_ms, "ideal_s": ideal_s, "export": export,
                               "service": [], "processes": None, "loadavg_start": os.getloadavg()}  # fmt: skip
    most = max([*sizes, processes, 1])
    work.mkdir(parents=True, exist_ok=True)
    with HttpLLM(delay_ms=delay_ms) as llm:
        mesh = ProcessMesh(
            work, llm_base_url=llm.base_url, start_timeout_s=60.0,
            llm={"base_url": llm.base_url, "timeout_s": 60, "max_retries": 0, **STYLES["transcript"]},
            session={"max_turns": turns},
            limits={"orchestrator": {"max_sessions": 2 * most, "max_sessions_per_client": 2 * most,
                                     "export": export}},
            server_bounds={"max_concurrent_rpcs": 8 * most, "max_connections": 8 * most},
            resilience={"health_timeout_s": 10.0, "grpc_retry": {"max_attempts": 2},
                        "circuit_breaker": {"failure_threshold": 50, "reset_timeout_s": 1.0}},
            deadlines={name: 10.0 for name in ("oauth", "memory", "calculator", "file_reader", "database_query")},
        )  # fmt: skip
        try:
            mesh.start()
            mesh.start("orchestrator")
            pid = mesh.servers["orchestrator"].pid
            others = [server.pid for server in mesh.all_servers() if server.process is not None and server.pid != pid]
            assert llm.process is not None
            others.append(llm.process.pid)
            for size in sizes:
                print(f"  {size} heists through orchestrator serve ...", flush=True)
                address = mesh.address("orchestrator")
                llm.reset()
                row = asyncio.run(through_service(mesh.config, address, pid, others, size, turns))
                row["of_ideal"] = round(row["wall_s"] / ideal_s, 2)
                floor(row, llm, size, delay_ms)
                results["service"].append(row)
                print(f"    {row}", flush=True)
            if processes:
                print(f"  {processes} orchestrator run processes ...", flush=True)
                llm.reset()
                row = asyncio.run(as_processes(mesh.config_path, work / "sessions", processes, turns))
                row["of_ideal"] = round(row["wall_s"] / ideal_s, 2)
                floor(row, llm, processes, delay_ms)
                results["processes"] = row
                print(f"    {row}", flush=True)
        finally:
            mesh.stop()
    results["loadavg_end"] = os.getloadavg()
    return results


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench.service", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="64,256", help="heists at once through the service (comma-separated)")
    parser.add_argument("--processes", type=int, default=64, help="orchestrator run processes at once (0: none)")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--delay-ms", type=int, default=1000, help="the model endpoint's latency per completion")
    parser.add_argument("--no-export", action="store_true", help="the service writes no session files")
    parser.add_argument("--out", type=Path, default=Path("var/bench/service.json"))
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",") if size.strip()]
    if not all(1 <= size <= 1024 for size in sizes) or not 0 <= args.processes <= 256 or not 1 <= args.turns <= 64:
        parser.error("sizes 1..1024, processes 0..256, turns 1..64")
    os.chdir(REPO)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="heist-bench-service-") as tmp:
        results = service_bench(Path(tmp), sizes, args.processes, args.turns, args.delay_ms, not args.no_export)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
