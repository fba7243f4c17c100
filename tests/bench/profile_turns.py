"""Profile whole turns through the real path: cProfile of one session, CPU of the event-loop thread.

    python -m tests.bench.profile_turns --style chat --turns 220 [--out chat.prof]

Starts the benchmark mesh (every service a process) and the HTTP endpoint,
runs a warm-up session, then one unprofiled session (CPU per turn of the
process and of its event-loop thread) and one profiled session. The profiler's
timer is ``time.thread_time``, so time spent waiting for a core on a busy
machine is not counted; profiling inflates the totals a few times, so read
the shares. Prints self time by package and the cumulative time per turn of
the functions a turn is made of; ``--out`` keeps the raw ``pstats`` file.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

from tests.bench.http_llm import HttpLLM
from tests.bench.http_turns import STYLES, run_http_session, style_config
from tests.bench.procs import BenchMesh

TURN_PARTS = (
    "take_turn", "complete", "complete_text", "async_maybe_transform", "request", "_build_request",
    "handle_async_request", "_process_response", "call", "write_turn", "render_result",
)  # fmt: skip
"""Functions shown with their cumulative time per turn (where they live in orchestrator/, openai/ or a transport)."""


def package_of(path: str) -> str:
    """Group a profiled file: a site-packages distribution, an orchestrator module, or the stdlib module."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0]
    if "/orchestrator/" in path:
        return "orchestrator/" + path.split("/orchestrator/", 1)[1]
    if "python3." in path and "/lib/" in path:
        return "stdlib " + path.rsplit("/lib/", 1)[1].split("/", 2)[1]
    return path


def short_path(path: str) -> str:
    """A profiled file as ``package/module.py`` (site-packages and the repository stripped)."""
    for marker in ("site-packages/", "/orchestrator/"):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail if marker == "site-packages/" else "orchestrator/" + tail
    return path


def report(stats: pstats.Stats, turns: int, top: int = 14) -> None:
    """Print self time by package and the cumulative time per turn of the turn's parts."""
    raw = stats.stats  # type: ignore[attr-defined]
    total = sum(row[2] for row in raw.values())
    by_package: collections.Counter[str] = collections.Counter()
    for (path, _, function), row in raw.items():
        by_package[package_of(path) if not path.startswith("~") else f"builtin {function}"] += row[2]
    print(f"{total:.2f} s of CPU for {turns} turns (profiled); self time by package:")
    for name, seconds in by_package.most_common(top):
        print(f"  {100 * seconds / total:5.1f}%  {name}")
    print("cumulative per turn (profiled):")
    rows = sorted(raw.items(), key=lambda item: -item[1][3])
    for (path, line, function), row in rows:
        interesting = "orchestrator/" in path or "openai/" in path or "_transports" in path
        if function in TURN_PARTS and interesting:
            print(f"  {1000 * row[3] / turns:7.2f} ms  {short_path(path)}:{line} {function}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.profile_turns", description=__doc__.split("\n")[0])
    parser.add_argument("--style", choices=tuple(STYLES), default="chat")
    parser.add_argument("--turns", type=int, default=220)
    parser.add_argument("--out", type=Path, default=None, help="write the pstats file here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="heist-profile-") as tmp:
        mesh = BenchMesh(Path(tmp))
        llm = HttpLLM()
        try:
            mesh.start()
            llm.start()
            config = style_config(mesh.config, args.style, llm.base_url)
            asyncio.run(run_http_session(config, 30, f"warm_{time.time_ns()}"))
            process, thread = time.process_time(), time.thread_time()
            _, _, wall = asyncio.run(run_http_session(config, args.turns, f"plain_{time.time_ns()}"))
            process, thread = time.process_time() - process, time.thread_time() - thread
            print(
                f"{args.style}, {args.turns} turns unprofiled: wall {1000 * wall / args.turns:.2f} ms/turn, CPU "
                f"{1000 * process / args.turns:.2f} ms/turn (process), {1000 * thread / args.turns:.2f} (event loop)"
            )
            profiler = cProfile.Profile(time.thread_time)
            profiler.enable()
            asyncio.run(run_http_session(config, args.turns, f"profiled_{time.time_ns()}"))
            profiler.disable()
        finally:
            llm.stop()
            mesh.stop()
    stats = pstats.Stats(profiler)
    if args.out is not None:
        stats.dump_stats(args.out)
    report(stats, args.turns)


if __name__ == "__main__":
    main()
