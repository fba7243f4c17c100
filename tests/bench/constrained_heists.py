"""Whole heists on the embedded model, constrained tool arguments off versus auto (``make eval``).

    python -m tests.bench.constrained_heists [--seeds 20] [--turns 12] [--out var/bench/constrained_heists.json]

Every service runs as its own process on free ports, our own
``llama-server`` serves Gemma 3 270M (tests/bench/llm_e2e.py), and each
heist is a real session through the orchestrator with the shipped crew and the
shipped ``llm`` section (transcript prompts, a prefilled marker every second
line of a tool agent, max_tokens 60), only ``llm.constrained_tools`` differing.
The two modes alternate seed by seed, so drift in the machine's load hits both
alike; a seed fixes the schedule and the sampling seeds of its requests.

Reported per mode:

* tool calls accepted: ``tool_usage`` rows with success, over all rows (every
  marker the model wrote or completed, as the services judged it);
* own words: turns whose message, tool markers and results removed, is not
  empty, not "(says nothing)", not an LLM error, and not a parrot of a line
  the turn's prompt showed (``orchestrator.turn.prompts.parrots``);
* turns per minute: turns over the summed wall time of the turns.

Not a test: numbers on a shared machine are measurements.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from heist_common.audit import AuditStore
from heist_common.config import HeistConfig, LLMConfig
from orchestrator.llm.client import LLMClient
from orchestrator.mesh.clients import ServiceClients
from orchestrator.session.runner import RunOptions, SessionRunner
from orchestrator.turn.constrained_tools import FALLBACK_OPERATION
from orchestrator.turn.prompts import NO_REPLY, one_line, parrots
from tests.bench.llm_e2e import LlamaServer
from tests.bench.procs import machine_info
from tests.support.config import shipped, unattended_agents
from tests.support.processes import ProcessMesh

MODES = ("off", "auto")
TARGETS = {"accepted_pct": 95.0, "turns_per_min_loss_pct": 15.0}


def eval_config(config: HeistConfig, base_url: str, mode: str) -> HeistConfig:
    """The mesh's config with the shipped ``llm`` section, on our server, in ``mode``."""
    llm = LLMConfig.model_validate(shipped()["llm"]).model_copy(
        update=dict(base_url=base_url, embedded=False, timeout_s=120.0, max_retries=0, constrained_tools=mode)
    )
    return config.with_overrides(llm=llm)


def own_words(message: str, spoken: list[str]) -> bool:
    """Whether a turn's message is the model's own line (see the module doc)."""
    if message == NO_REPLY or message.startswith("Error generating response"):
        return False
    return not parrots(message, spoken)


async def heist(config: HeistConfig, seed: int, turns: int) -> dict[str, Any]:
    """One session; returns its counts (from the result and the audit database)."""
    random.seed(seed)  # the requests' sampling seeds (orchestrator.llm.client) follow from it
    audit = AuditStore.open(config.database.url)
    clients = ServiceClients(config)
    llm = LLMClient(config.llm)
    session_id = f"eval_{config.llm.constrained_tools}_{seed}_{time.time_ns()}"
    try:
        runner = SessionRunner(config, clients, llm, audit, RunOptions(turns=turns, seed=seed, session_id=session_id))
        result = await runner.run()
    finally:
        await clients.close()
        await llm.close()
        audit.close()
    database = sqlite3.connect(config.database.url.removeprefix("sqlite:///"))
    try:
        rows = database.execute(
            "SELECT success, tool_name, tool_params, status_code, tool_result FROM tool_usage"
            " WHERE session_id = ? ORDER BY id",
            (session_id,),
        ).fetchall()
        fallbacks = database.execute(
            "SELECT COUNT(*) FROM events WHERE session_id = ? AND operation = ?", (session_id, FALLBACK_OPERATION)
        ).fetchone()[0]
    finally:
        database.close()
    context = config.session.context_messages
    own = 0
    for index, turn in enumerate(result.turns):
        earlier = result.turns[max(0, index - context) : index] if context else []
        spoken = [said for t in earlier if (said := one_line(t.message))]
        own += own_words(turn.message, spoken)
    return {
        "seed": seed,
        "status": result.status,
        "turns": len(result.turns),
        "turn_seconds": round(sum(t.total_ms for t in result.turns) / 1000.0, 3),
        "llm_seconds": round(sum(t.llm_ms for t in result.turns) / 1000.0, 3),
        "tool_calls": len(rows),
        "accepted": sum(int(row[0]) for row in rows),
        "own_words": own,
        "fallbacks": fallbacks,
        "refused": [[tool, params, code, result_text[:120]] for ok, tool, params, code, result_text in rows if not ok],
        "messages": [f"{t.agent_name}: {t.message[:200]}" for t in result.turns],
        "turn_ms": [round(t.total_ms) for t in result.turns],
        "tool_turns": [bool(t.tool_usage) for t in result.turns],
    }


def summarize(heists: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool one mode's heists."""
    calls = sum(h["tool_calls"] for h in heists)
    accepted = sum(h["accepted"] for h in heists)
    turns = sum(h["turns"] for h in heists)
    seconds = sum(h["turn_seconds"] for h in heists)
    return {
        "heists": len(heists),
        "completed": sum(h["status"] == "completed" for h in heists),
        "turns": turns,
        "tool_calls": calls,
        "accepted": accepted,
        "accepted_pct": round(100.0 * accepted / calls, 1) if calls else None,
        "own_words_pct": round(100.0 * sum(h["own_words"] for h in heists) / turns, 1) if turns else None,
        "turns_per_min": round(60.0 * turns / seconds, 2) if seconds else None,
        # A heist slowed by other work on the machine weighs less in the median.
        "turns_per_min_median": round(statistics.median(60.0 * h["turns"] / h["turn_seconds"] for h in heists), 2)
        if heists
        else None,
        "fallbacks": sum(h["fallbacks"] for h in heists),
    }


def run(seeds: int, turns: int, out: Path | None, first_seed: int = 1) -> dict[str, Any]:
    """Serve the mesh and the model, run ``seeds`` heists per mode (alternating), write and return the results."""
    crew = shipped()
    results: dict[str, Any] = {
        "machine": machine_info(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seeds": seeds,
        "turns": turns,
        "targets": TARGETS,
    }
    heists: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="heist-eval-") as tmp:
        work = Path(tmp)
        session = {**crew["session"], "max_turns": turns}
        mesh = ProcessMesh(work, agents=unattended_agents(), session=session)
        server = LlamaServer(work / "llama.log")
        try:
            mesh.start()
            server.start()
            configs = {mode: eval_config(mesh.config, server.base_url, mode) for mode in MODES}
            asyncio.run(heist(configs["off"], 0, 2))  # warm-up: model pages, prompt cache, channels
            for seed in range(first_seed, first_seed + seeds):
                for mode in MODES if seed % 2 else reversed(MODES):
                    outcome = asyncio.run(heist(configs[mode], seed, turns))
                    heists[mode].append(outcome)
                    lists = ("messages", "refused", "turn_ms", "tool_turns")
                    counts = {k: v for k, v in outcome.items() if k not in lists}
                    print(f"seed {seed:2d} {mode:4s} {json.dumps(counts)}", flush=True)
        finally:
            server.stop()
            mesh.stop()
    results["heists"] = heists
    results["summary"] = {mode: summarize(heists[mode]) for mode in MODES}
    for key in ("turns_per_min", "turns_per_min_median"):
        before, after = results["summary"]["off"][key], results["summary"]["auto"][key]
        results[f"{key}_loss_pct"] = (
            round(100.0 * (1.0 - after / before), 1) if before and after else None
        )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def print_table(results: dict[str, Any]) -> None:
    """The summary as a small table."""
    print(f"\n{results['seeds']} seeded heists of {results['turns']} turns per mode")
    columns = ("accepted", 14), ("own words", 10), ("turns/min", 10), ("median", 7), ("fallbacks", 10)
    print(f"{'constrained_tools':18s} " + " ".join(f"{name:>{width}s}" for name, width in columns))
    for mode, row in results["summary"].items():
        accepted = f"{row['accepted']}/{row['tool_calls']} {row['accepted_pct']}%"
        own, rate = row["own_words_pct"], row["turns_per_min"]
        median = row["turns_per_min_median"]
        print(f"{mode:18s} {accepted:>14s} {own:>9}% {rate:>10} {median:>7} {row['fallbacks']:>10}")
    loss, median_loss = results["turns_per_min_loss_pct"], results["turns_per_min_median_loss_pct"]
    print(f"turns/min loss: {loss}% pooled, {median_loss}% on the medians")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seeds", type=int, default=20, help="heists per mode (default 20)")
    parser.add_argument("--turns", type=int, default=12, help="turns per heist (default 12)")
    parser.add_argument("--first-seed", type=int, default=1, help="seeds run from here (default 1)")
    parser.add_argument("--out", type=Path, default=Path("var/bench/constrained_heists.json"))
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.turns < 1:
        parser.error("--seeds and --turns must be at least 1")
    results = run(args.seeds, args.turns, args.out, args.first_seed)
    print_table(results)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
