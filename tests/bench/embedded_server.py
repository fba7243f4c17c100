"""The embedded model's server: one heist against four at once, constrained against free tool turns, tokens/s.

    python -m tests.bench.embedded_server [--turns 8] [--servers llama-server,llama_cpp.server]
                                          [--out var/bench/embedded_server.json]

Every service runs as its own process on free ports; the model server is ours
on a free port, started as ``make serve`` starts it (``llama-server``) or, for
comparison, llama-cpp-python's ``python -m llama_cpp.server`` (one request at a
time), both on the same llama.cpp libraries. Heists use the shipped crew and
``llm`` section (transcript, a prefilled tool marker every second line).

* **one vs four**: seeds 1-4 played one after the other (the mean is "one"),
  then the same four at once; the ratio is the wall time of the four over one.
* **constrained vs free**: the tool turns (those with a tool call) of heists with
  ``constrained_tools: auto`` against ``off``, the same seeds, modes
  alternating; the mean turn time of each.
* **generation**: tokens/s of plain completions, one stream and four at once.

Not a test: numbers on a shared machine are measurements (the load average is recorded).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import openai

from heist_common.audit import AuditStore
from heist_common.config import HeistConfig
from orchestrator.llm.client import LLMClient
from orchestrator.mesh.clients import ServiceClients
from orchestrator.session.runner import RunOptions, SessionRunner
from tests.bench.constrained_heists import eval_config, heist
from tests.bench.llm_e2e import LlamaServer
from tests.bench.procs import machine_info
from tests.support.config import shipped, unattended_agents
from tests.support.processes import ProcessMesh

SERVERS = {"llama-server": False, "llama_cpp.server": True}
"""Name -> whether it is the legacy server (``LlamaServer(legacy=...)``)."""
TARGETS = {"four_over_one": 2.0, "constrained_extra_pct": 5.0}
GENERATION_PROMPT = "The crew met in the back room of the bakery. The planner unrolled the map and said:"


async def play(config: HeistConfig, seeds: tuple[int, ...], turns: int) -> tuple[float, list[str]]:
    """Play one heist per seed at once in one orchestrator (one audit writer, one mesh, one LLM client).

    Returns the wall time and each session's status.
    """
    random.seed(seeds[0])  # the requests' sampling seeds (orchestrator.llm.client) follow from it
    audit = AuditStore.open(config.database.url)
    clients = ServiceClients(config)
    llm = LLMClient(config.llm)
    try:
        runners = [
            SessionRunner(config, clients, llm, audit, RunOptions(
                turns=turns, seed=seed, session_id=f"par_{seed}_{time.time_ns()}", export=False))
            for seed in seeds
        ]  # fmt: skip
        started = time.perf_counter()
        results = await asyncio.gather(*(runner.run() for runner in runners))
        wall = time.perf_counter() - started
    finally:
        await clients.close()
        await llm.close()
        audit.close()
    return wall, [result.status for result in results]


async def one_vs_four(config: HeistConfig, turns: int) -> dict[str, Any]:
    """Seeds 1-4 one at a time, then all four at once."""
    alone = []
    for seed in (1, 2, 3, 4):
        wall, statuses = await play(config, (seed,), turns)
        alone.append(wall)
        if statuses != ["completed"]:
            raise RuntimeError(f"heist {seed} {statuses}")
    together, statuses = await play(config, (1, 2, 3, 4), turns)
    one = statistics.mean(alone)
    return {
        "one_heist_s": [round(s, 2) for s in alone],
        "one_heist_mean_s": round(one, 2),
        "four_at_once_s": round(together, 2),
        "four_completed": statuses.count("completed"),
        "four_over_one": round(together / one, 2),
    }


async def constrained_vs_free(mesh_config: HeistConfig, base_url: str, turns: int, seeds: int) -> dict[str, Any]:
    """Mean time of the turns with a tool call (mostly the prefilled ones), ``constrained_tools`` auto against off."""
    tool_turn_ms: dict[str, list[float]] = {"off": [], "auto": []}
    accepted: dict[str, list[int]] = {"off": [0, 0], "auto": [0, 0]}
    for seed in range(1, seeds + 1):
        for mode in ("off", "auto") if seed % 2 else ("auto", "off"):
            outcome = await heist(eval_config(mesh_config, base_url, mode), seed, turns)
            turn_ms = zip(outcome["turn_ms"], outcome["tool_turns"], strict=True)
            tool_turn_ms[mode] += [ms for ms, tool_turn in turn_ms if tool_turn]
            accepted[mode][0] += outcome["accepted"]
            accepted[mode][1] += outcome["tool_calls"]
    if not tool_turn_ms["off"] or not tool_turn_ms["auto"]:
        raise RuntimeError(f"no tool turns to compare: {tool_turn_ms}")
    free, constrained = statistics.mean(tool_turn_ms["off"]), statistics.mean(tool_turn_ms["auto"])
    return {
        "tool_turns": {mode: len(values) for mode, values in tool_turn_ms.items()},
        "free_tool_turn_ms": round(free, 1),
        "constrained_tool_turn_ms": round(constrained, 1),
        "constrained_extra_pct": round(100.0 * (constrained / free - 1.0), 1),
        "accepted": {mode: f"{ok}/{calls}" for mode, (ok, calls) in accepted.items()},
    }


async def generation(base_url: str, alias: str, tokens: int) -> dict[str, Any]:
    """Tokens/s of plain completions: one stream (three requests in a row), then four streams at once."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", timeout=300, max_retries=0)

    async def complete(seed: int) -> int:
        reply = await client.completions.create(
            model=alias, prompt=GENERATION_PROMPT, max_tokens=tokens, temperature=0.8, seed=seed,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        return reply.usage.completion_tokens if reply.usage else 0

    try:
        await complete(0)  # warm-up
        started = time.perf_counter()
        one = [await complete(seed) for seed in (1, 2, 3)]
        one_s = time.perf_counter() - started
        started = time.perf_counter()
        four = await asyncio.gather(*(complete(seed) for seed in (4, 5, 6, 7)))
        four_s = time.perf_counter() - started
    finally:
        await client.close()
    return {
        "one_stream_tokens_per_s": round(sum(one) / one_s, 1),
        "four_streams_tokens_per_s": round(sum(four) / four_s, 1),
        "tokens_per_request": tokens,
    }


def run(servers: list[str], turns: int, seeds: int, tokens: int, out: Path | None) -> dict[str, Any]:
    """Serve the mesh, then each server in turn: measure, stop it. Writes and returns the results."""
    crew = shipped()
    results: dict[str, Any] = {
        "machine": machine_info(),
        "loadavg_start": list(os.getloadavg()),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "turns": turns,
        "targets": TARGETS,
    }
    with tempfile.TemporaryDirectory(prefix="heist-embedded-") as tmp:
        work = Path(tmp)
        session = {**crew["session"], "max_turns": turns}
        mesh = ProcessMesh(work, agents=unattended_agents(), session=session)
        try:
            mesh.start()
            for name in servers:
                print(f"{name}: starting", flush=True)
                server = LlamaServer(work / f"{name}.log", legacy=SERVERS[name])
                try:
                    server.start()
                    config = eval_config(mesh.config, server.base_url, "auto")
                    asyncio.run(heist(config, 0, 2))  # warm-up: model pages, channels
                    row: dict[str, Any] = {}
                    row["generation"] = asyncio.run(generation(server.base_url, server.alias, tokens))
                    print(f"{name}: generation {row['generation']}", flush=True)
                    row["one_vs_four"] = asyncio.run(one_vs_four(config, turns))
                    print(f"{name}: one vs four {row['one_vs_four']}", flush=True)
                    row["constrained"] = asyncio.run(constrained_vs_free(mesh.config, server.base_url, turns, seeds))
                    print(f"{name}: constrained vs free {row['constrained']}", flush=True)
                    results[name] = row
                finally:
                    server.stop()
        finally:
            mesh.stop()
    results["loadavg_end"] = list(os.getloadavg())
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def print_table(results: dict[str, Any]) -> None:
    """One row per server."""
    print(f"\nembedded model server, heists of {results['turns']} turns; load {results['loadavg_start']}")
    print(f"{'server':18s} {'1 stream':>9s} {'4 streams':>10s} {'1 heist':>8s} {'4 at once':>10s} {'ratio':>6s}"
          f" {'free tool turn':>15s} {'constrained':>12s} {'extra':>7s}")  # fmt: skip
    for name in SERVERS:
        row = results.get(name)
        if not row:
            continue
        gen, par, con = row["generation"], row["one_vs_four"], row["constrained"]
        print(
            f"{name:18s} {gen['one_stream_tokens_per_s']:>9} {gen['four_streams_tokens_per_s']:>10}"
            f" {par['one_heist_mean_s']:>8} {par['four_at_once_s']:>10} {par['four_over_one']:>6}"
            f" {con['free_tool_turn_ms']:>15} {con['constrained_tool_turn_ms']:>12} {con['constrained_extra_pct']:>6}%"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--turns", type=int, default=8, help="turns per heist (default 8)")
    parser.add_argument("--seeds", type=int, default=4, help="heists per mode for constrained vs free (default 4)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per generation request (default 64)")
    parser.add_argument("--servers", default="llama-server,llama_cpp.server", help="comma-separated, of: "
                        + ", ".join(SERVERS))  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("var/bench/embedded_server.json"))
    args = parser.parse_args(argv)
    servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    unknown = set(servers) - set(SERVERS)
    if unknown or not 1 <= args.turns <= 64 or not 1 <= args.seeds <= 20 or not 1 <= args.tokens <= 512:
        parser.error(f"unknown servers {sorted(unknown)}" if unknown else "turns 1-64, seeds 1-20, tokens 1-512")
    results = run(servers, args.turns, args.seeds, args.tokens, args.out)
    print_table(results)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
