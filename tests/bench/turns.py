"""Per-turn mesh overhead and parallel sessions, against server processes, with the in-process zero-latency LLM."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

from heist_common.audit import AuditStore
from heist_common.config import HeistConfig
from orchestrator.llm.client import LLMClient
from orchestrator.mesh.clients import ServiceClients
from orchestrator.session.runner import RunOptions, SessionRunner
from orchestrator.turn.turn import Turn
from tests.bench.fake_llm import InstantLLM


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p90/p99/mean/max of ``samples`` (ms), rounded to microseconds."""
    ordered = sorted(samples)

    def at(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    return {
        "n": len(ordered),
        "p50_ms": round(at(0.50), 3),
        "p90_ms": round(at(0.90), 3),
        "p99_ms": round(at(0.99), 3),
        "mean_ms": round(statistics.fmean(ordered), 3),
        "max_ms": round(ordered[-1], 3),
    }


async def run_sessions(
    config: HeistConfig,
    sessions: int,
    turns: int,
    *,
    delay_s: float = 0.0,
    prefix: str = "bench",
    llm: LLMClient | None = None,
    on_turn: Callable[[Turn], None] | None = None,
) -> tuple[list[Turn], float]:
    """Run ``sessions`` sessions of ``turns`` turns at once on one shared mesh; return the turns and the wall time.

    ``llm``: the client every session shares (closed at the end); default an in-process
    ``InstantLLM`` answering after ``delay_s``.
    """
    audit = AuditStore.open(config.database.url)
    mesh = ServiceClients(config)
    llm = llm or InstantLLM(config.llm, delay_s)
    try:
        runners = [
            SessionRunner(
                config, mesh, llm, audit,
                RunOptions(turns=turns, session_id=f"{prefix}_{i}_{time.time_ns()}", export=False), on_turn=on_turn,
            )
            for i in range(sessions)
        ]  # fmt: skip
        start = time.perf_counter()
        results = await asyncio.gather(*(runner.run() for runner in runners))
        wall_s = time.perf_counter() - start
    finally:
        await mesh.close()
        await llm.close()
        audit.close()
    for result in results:
        if result.status != "completed":
            raise RuntimeError(f"benchmark session {result.session_id} {result.status}: {result.error}")
    return [turn for result in results for turn in result.turns], wall_s


def check_turns(turns: list[Turn]) -> None:
    """Every measured turn must have made its one successful tool call (else the numbers mean nothing)."""
    bad = [t for t in turns if t.status != "ok" or len(t.tool_usage) != 1 or not t.tool_usage[0].success or t.events]
    if bad:
        t = bad[0]
        raise RuntimeError(
            f"{len(bad)} turns were not clean, e.g. turn {t.turn_id}: {t.status} {t.tool_usage} {t.events}"
        )


def summarize_turns(turns: list[Turn]) -> dict[str, Any]:
    """Percentiles of total_ms and service_ms, overall and per tool."""
    by_tool: dict[str, list[Turn]] = {}
    for turn in turns:
        by_tool.setdefault(turn.tool_usage[0].tool_name, []).append(turn)
    return {
        "total_ms": percentiles([t.total_ms for t in turns]),
        "service_ms": percentiles([t.service_ms for t in turns]),
        "tool_rpc_ms": percentiles([t.tool_usage[0].latency_ms or 0.0 for t in turns]),
        "by_tool_total_ms": {tool: percentiles([t.total_ms for t in ts]) for tool, ts in sorted(by_tool.items())},
    }


async def turn_overhead(config: HeistConfig, turns: int, warmup: int = 60) -> dict[str, Any]:
    """Part 1: one session after a warm-up session; every turn one tool call, the LLM in-process and instant."""
    await run_sessions(config, 1, warmup, prefix="warmup")
    measured, wall_s = await run_sessions(config, 1, turns, prefix="turns")
    check_turns(measured)
    return {"turns": len(measured), "wall_s": round(wall_s, 3), **summarize_turns(measured)}


async def parallel_sessions(
    config: HeistConfig, counts: list[int], turns_per_session: int, delay_s: float = 0.0
) -> list[dict[str, Any]]:
    """Part 3: N sessions at once on one mesh (one orchestrator process): aggregate turns/s and p99."""
    rows = []
    for count in counts:
        measured, wall_s = await run_sessions(config, count, turns_per_session, delay_s=delay_s, prefix=f"par{count}")
        check_turns(measured)
        stats = percentiles([t.total_ms for t in measured])
        rows.append(
            {
                "sessions": count,
                "llm_delay_ms": delay_s * 1000,
                "turns": len(measured),
                "wall_s": round(wall_s, 3),
                "turns_per_s": round(len(measured) / wall_s, 1),
                "turn_p50_ms": stats["p50_ms"],
                "turn_p99_ms": stats["p99_ms"],
            }
        )
    return rows


def bench_config(config: HeistConfig) -> HeistConfig:
    """The config with the LLM section the in-process LLM expects (transcript, a tool marker every turn).

    ``constrained_tools: off``: one LLM request per turn, so these rows stay the services-only
    turn they have always been (the grammar's second request is measured in the real-path section).
    """
    llm = config.llm.model_copy(
        update=dict(prompt_style="transcript", prefill_tool_every=1, tool_calling="inline", constrained_tools="off")
    )
    return config.with_overrides(llm=llm)
