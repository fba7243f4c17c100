"""Whole turns through the real path: the ``openai`` client, HTTP, an OpenAI-compatible endpoint, server processes.

Part 1 of ``make bench``. For each prompt style:

- **turns**: one warm-up session, then one measured session of the real
  ``LLMClient`` against ``tests.bench.http_llm`` (a separate process on
  127.0.0.1, zero latency, keep-alive), every gRPC service its own process.
  ``transcript``/``inline``: one ``/v1/completions`` request and one tool call
  per turn. ``chat``/``native``: ``tools`` offered, a ``tool_calls`` reply, the
  tool call, the final answer: two ``/v1/chat/completions`` requests per turn.
- **floor**: the same HTTP requests (the very bytes the session sent, replayed)
  and the same gRPC calls (memory prefetch for the next speaker, the tool,
  StoreMemory), with the same overlap, issued back to back by a minimal loop:
  no prompts, no audit, no ``openai`` SDK, no parsing. Turn minus floor is
  what orchestration costs.
- **whole process**: ``orchestrator run`` as a user runs it, timed for 20 and
  220 turns; (t220 - t20) / 200 is the per-turn cost with start-up cancelled
  out (the issue's method, so it compares with the seed's figures).
"""

from __future__ import annotations

import asyncio
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import yaml
from heist.memory.v1 import memory_pb2, memory_pb2_grpc
from heist.oauth.v1 import oauth_pb2, oauth_pb2_grpc

from heist_common.config import HeistConfig
from heist_common.contract import AUTHORIZATION_METADATA_KEY, SESSION_METADATA_KEY, contract_of
from heist_common.credentials import client_secret
from heist_common.tools.registry import ToolRegistry
from orchestrator.llm.client import LLMClient
from orchestrator.turn.turn import Turn
from tests.bench.http_llm import ARGUMENTS, HttpLLM
from tests.bench.turns import check_turns, percentiles, run_sessions
from tests.support.processes import REPO

STYLES: dict[str, dict[str, Any]] = {
    "transcript": {
        "prompt_style": "transcript", "tool_calling": "inline", "prefill_tool_every": 1, "constrained_tools": "off",
    },
    "transcript_grammar": {
        "prompt_style": "transcript", "tool_calling": "inline", "prefill_tool_every": 1, "constrained_tools": "auto",
    },
    "chat": {"prompt_style": "chat", "tool_calling": "native", "prefill_tool_every": 0},
}  # fmt: skip
"""The prompt styles measured: transcript with inline markers and one request per turn (the issue's
turn, ``constrained_tools: off``); the same under the default ``constrained_tools: auto``, where the
prefilled argument is one request under the tool's grammar and the rest of the line another; chat
with native function calling (strict tool schemas, the default), a tool round of two requests."""
LLM_REQUESTS_PER_TURN = {"transcript": 1, "transcript_grammar": 2, "chat": 2}


def style_llm(config: HeistConfig, style: str, base_url: str) -> dict[str, Any]:
    """The ``llm`` section for ``style`` against ``base_url`` (as data, for config files and overrides)."""
    return {
        "embedded": False, "base_url": base_url, "model": "bench", "timeout_s": 10.0, "health_timeout_s": 2.0,
        "max_retries": 1, "max_tokens": 60, **STYLES[style],
    }  # fmt: skip


def style_config(config: HeistConfig, style: str, base_url: str) -> HeistConfig:
    """``config`` with the ``llm`` section of ``style`` pointing at ``base_url``."""
    return config.with_overrides(llm=config.llm.model_copy(update=style_llm(config, style, base_url)))


def write_style_config(config_path: Path, style: str, base_url: str, config: HeistConfig) -> Path:
    """A config file for ``orchestrator run`` (the mesh's file with the style's ``llm`` section)."""
    data = yaml.safe_load(config_path.read_text())
    data["llm"] = style_llm(config, style, base_url)
    path = config_path.with_name(f"heist-{style}.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


async def run_http_session(
    config: HeistConfig, turns: int, session_id: str, *, sessions: int = 1
) -> tuple[list[Turn], list[tuple[float, float]], float]:
    """``sessions`` sessions of ``turns`` turns with the real ``LLMClient``; (turns, (start, end) of each, wall s)."""
    spans: list[tuple[float, float]] = []

    def ended(turn: Turn) -> None:
        now = time.perf_counter()
        spans.append((now - turn.total_ms / 1000.0, now))

    turns_run, wall_s = await run_sessions(
        config, sessions, turns, prefix=session_id, llm=LLMClient(config.llm), on_turn=ended
    )
    return turns_run, spans, wall_s


class RawHTTP:
    """The least an HTTP client does: HTTP/1.1 keep-alive on one asyncio stream (the endpoint sends Content-Length)."""

    def __init__(self, base_url: str, api_key: str) -> None:
        host_port = base_url.split("//", 1)[1].split("/", 1)[0]
        self.host, _, port = host_port.partition(":")
        self.port = int(port or 80)
        self.head = f"host: {host_port}\r\ncontent-type: application/json\r\nauthorization: Bearer {api_key}\r\n"
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, route: str, body: bytes) -> bytes:
        """POST ``body`` to ``route``; the reply's body (RuntimeError unless 200)."""
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        head = f"POST {route} HTTP/1.1\r\n{self.head}content-length: {len(body)}\r\n\r\n"
        writer.write(head.encode() + body)
        reply = await reader.readuntil(b"\r\n\r\n")
        if not reply.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"endpoint answered {reply[:40]!r}")
        length = int(reply.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        return await reader.readexactly(length)

    async def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()


class Floor:
    """The minimal loop: a turn's HTTP requests and gRPC calls, and nothing else."""

    def __init__(self, config: HeistConfig, base_url: str) -> None:
        self.config = config
        self.base_url = base_url
        self.registry = ToolRegistry.for_services(config.tool_names)
        self.crew = [agent for agent in config.agents if agent.tools]

    async def run(self, bodies: list[tuple[str, bytes]], per_turn: int, messages: list[str]) -> list[float]:
        """Replay ``bodies`` (``per_turn`` a turn) with the turn's gRPC calls; per-turn milliseconds."""
        config = self.config
        session = f"floor_{time.time_ns()}"
        channels = {name: grpc.aio.insecure_channel(s.address) for name, s in config.services.items()}
        http = RawHTTP(self.base_url, config.llm.api_key)
        try:
            memory = memory_pb2_grpc.MemoryServiceStub(channels["memory"])
            oauth = oauth_pb2_grpc.OAuthServiceStub(channels["oauth"])
            plain = ((SESSION_METADATA_KEY, session),)

            async def bearer(client_id: str, scopes: list[str]) -> tuple[tuple[str, str], ...]:
                """The session's metadata with a token the OAuth service issued to ``client_id`` for it."""
                request = oauth_pb2.IssueTokenRequest(
                    grant_type="client_credentials", client_id=client_id,
                    client_secret=client_secret(config, client_id), scopes=scopes,
                )  # fmt: skip
                issued = await oauth.IssueToken(request, metadata=plain, timeout=5)
                return (*plain, (AUTHORIZATION_METADATA_KEY, f"Bearer {issued.access_token}"))

            # Memory answers only a token bound to the session, issued to the orchestrator's own client.
            auth = await bearer(config.session.oauth_client, list(contract_of("memory").scopes))
            memory_config = config.session.memory
            calls = []
            for agent in self.crew:
                service = self.registry.service(agent.tools[0])
                method = service.inline_method
                assert method is not None
                scope = [method.required_scope] if method.required_scope else []
                stub = service.stub_class(channels[service.name])
                calls.append(
                    (
                        agent.name,
                        getattr(stub, method.method.name),
                        method.inline_request(ARGUMENTS[service.name]),
                        await bearer(agent.oauth_client, scope),
                        config.services[service.name].deadline_s,
                        memory_pb2.GetCompressedMemoryRequest(
                            agent_name=agent.name, recent_count=memory_config.recent_count,
                            max_chars=memory_config.max_chars,
                        ),
                    )
                )  # fmt: skip
            await asyncio.gather(*(channel.channel_ready() for channel in channels.values()))
            await http.post(*bodies[0])
            samples: list[float] = []
            turns = len(bodies) // per_turn
            prefetched = asyncio.ensure_future(memory.GetCompressedMemory(calls[0][5], metadata=auth, timeout=2))
            for index in range(turns):
                name, rpc, request, metadata, deadline, _ = calls[index % len(calls)]
                started = time.perf_counter()
                await prefetched
                following = calls[(index + 1) % len(calls)][5]
                prefetched = asyncio.ensure_future(memory.GetCompressedMemory(following, metadata=auth, timeout=2))
                for step in range(per_turn):
                    route, body = bodies[index * per_turn + step]
                    await http.post(route, body)
                    if step == 0:
                        await rpc(request, metadata=metadata, timeout=deadline)
                store = memory_pb2.StoreMemoryRequest(agent_name=name, turn_id=index + 1, message=messages[index])
                await memory.StoreMemory(store, metadata=auth, timeout=2)
                samples.append((time.perf_counter() - started) * 1000.0)
            await prefetched
            return samples
        finally:
            await http.close()
            await asyncio.gather(*(channel.close(None) for channel in channels.values()))


def turn_stats(turns: list[Turn]) -> dict[str, Any]:
    """Percentiles of whole turns and of the LLM requests in them."""
    return {
        "total_ms": percentiles([t.total_ms for t in turns]),
        "llm_ms": percentiles([t.llm_ms for t in turns]),
        "service_ms": percentiles([t.service_ms for t in turns]),
    }


def http_turns(
    config: HeistConfig, llm: HttpLLM, style: str, turns: int, warmup: int, blocks: int = 5
) -> dict[str, Any]:
    """Part 1 for one style: the turns, their floor, and the endpoint's own cost.

    Sessions and floor alternate in ``blocks`` (each floor block replays the session block
    just before it), so on a shared machine both see the same background load.
    """
    config = style_config(config, style, llm.base_url)
    asyncio.run(run_http_session(config, warmup, f"warm_{style}_{time.time_ns()}"))
    per_turn = LLM_REQUESTS_PER_TURN[style]
    measured: list[Turn] = []
    floor: list[float] = []
    wall_s = 0.0
    cpu_s = floor_cpu_s = 0.0
    endpoint_us: list[float] = []
    for block in range(blocks):
        llm.reset()
        session = run_http_session(config, max(1, turns // blocks), f"http_{style}_{block}_{time.time_ns()}")
        cpu_start = time.process_time()
        block_turns, _, block_wall_s = asyncio.run(session)
        cpu_s += time.process_time() - cpu_start
        check_turns(block_turns)
        served = llm.stats()
        bodies = llm.recorded()
        expected = per_turn * len(block_turns)
        if served["completions"] != expected or len(bodies) != expected:
            raise RuntimeError(f"{style}: {served['completions']} completions for {len(block_turns)} turns")
        endpoint_us.append(served["busy_us_per_completion"])
        messages = [t.message for t in block_turns]
        cpu_start = time.process_time()
        floor += asyncio.run(Floor(config, llm.base_url).run(bodies, per_turn, messages))
        floor_cpu_s += time.process_time() - cpu_start
        measured += block_turns
        wall_s += block_wall_s
    stats = turn_stats(measured)
    floor_stats = percentiles(floor)
    return {
        "style": style,
        "turns": len(measured),
        "blocks": blocks,
        "llm_requests_per_turn": per_turn,
        "wall_ms_per_turn": round(1000.0 * wall_s / len(measured), 3),
        **stats,
        "floor_ms": floor_stats,
        "overhead_p50_ms": round(stats["total_ms"]["p50_ms"] - floor_stats["p50_ms"], 3),
        "overhead_mean_ms": round(stats["total_ms"]["mean_ms"] - floor_stats["mean_ms"], 3),
        "endpoint_us_per_request": round(statistics.fmean(endpoint_us), 1),
        # CPU of this process per turn (all its threads): unlike wall time, barely moved by other load
        "cpu_ms_per_turn": round(1000.0 * cpu_s / len(measured), 3),
        "floor_cpu_ms_per_turn": round(1000.0 * floor_cpu_s / len(floor), 3),
        "overhead_cpu_ms_per_turn": round(1000.0 * (cpu_s / len(measured) - floor_cpu_s / len(floor)), 3),
    }


def orchestrator_command() -> list[str]:
    """The ``orchestrator`` console script of this interpreter's environment (``-m orchestrator.cli`` otherwise)."""
    script = Path(sys.executable).with_name("orchestrator")
    return [str(script)] if script.exists() else [sys.executable, "-m", "orchestrator.cli"]


def timed_run(command: list[str], *, timeout_s: float) -> tuple[float, float, subprocess.CompletedProcess[str], float]:
    """Run ``command`` from the repository once; (launch ``time.monotonic()``, wall s, the finished process, CPU s).

    The CPU seconds (user + system, from the reaped child's rusage) are what the command
    itself costs; on a busy machine the wall time adds the wait for a core. Output is
    captured: with pipes the wait ends when the child does, while a bare
    ``subprocess.run(timeout=...)`` polls with sleeps of up to 50 ms.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    launched = time.monotonic()
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    wall = time.monotonic() - launched
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return launched, wall, completed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_cli(args: list[str], *, timeout_s: float = 300.0) -> tuple[float, float, str, float]:
    """Run the CLI once; (launch ``time.monotonic()``, wall seconds, stdout, CPU seconds). Raises if it fails."""
    launched, wall, completed, cpu = timed_run([*orchestrator_command(), *args], timeout_s=timeout_s)
    if completed.returncode != 0:
        raise RuntimeError(f"orchestrator {' '.join(args)} exited {completed.returncode}:\n{completed.stderr[-2000:]}")
    return launched, wall, completed.stdout, cpu


def whole_process(config_file: Path, out_dir: Path, repeats: int, short: int = 20, long: int = 220) -> dict[str, Any]:
    """``orchestrator run`` for ``short`` and ``long`` turns, ``repeats`` times each; per turn from the medians."""
    walls: dict[int, list[float]] = {short: [], long: []}
    for _ in range(repeats):
        for turns in (short, long):
            _, wall, _, _ = run_cli(["--config", str(config_file), "run", "--turns", str(turns), "--out", str(out_dir)])
            walls[turns].append(wall)
    short_s, long_s = statistics.median(walls[short]), statistics.median(walls[long])
    return {
        "repeats": repeats,
        f"run_{short}_s": [round(w, 3) for w in walls[short]],
        f"run_{long}_s": [round(w, 3) for w in walls[long]],
        "ms_per_turn": round(1000.0 * (long_s - short_s) / (long - short), 3),
    }


def parallel_http(config: HeistConfig, llm: HttpLLM, style: str, sessions: int, turns: int) -> dict[str, Any]:
    """``sessions`` sessions at once through the endpoint (its ``delay_ms`` is the model's latency).

    turns/s is counted over the turns' own window (first turn start to last turn end), so the
    sessions' health checks and set-up are not in it; the ideal is every session always waiting
    on the model: sessions / (latency x LLM requests per turn).
    """
    config = style_config(config, style, llm.base_url)
    run = run_http_session(config, turns, f"par_{style}_{time.time_ns()}", sessions=sessions)
    measured, spans, _ = asyncio.run(run)
    check_turns(measured)
    window_s = max(end for _, end in spans) - min(start for start, _ in spans)
    per_turn = LLM_REQUESTS_PER_TURN[style]
    ideal = sessions / (llm.delay_ms / 1000.0 * per_turn)
    stats = percentiles([t.total_ms for t in measured])
    rate = len(measured) / window_s
    return {
        "style": style,
        "sessions": sessions,
        "llm_delay_ms": llm.delay_ms,
        "turns": len(measured),
        "window_s": round(window_s, 3),
        "turns_per_s": round(rate, 1),
        "ideal_turns_per_s": round(ideal, 1),
        "of_ideal_pct": round(100.0 * rate / ideal, 1),
        "turn_p50_ms": stats["p50_ms"],
        "turn_p99_ms": stats["p99_ms"],
    }
