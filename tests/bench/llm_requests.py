"""CPU per LLM request, layer by layer, against the benchmark endpoint: where a request's client-side time goes.

    python -m tests.bench.llm_requests [--requests 300]

The same chat request (a crew agent's messages and its tool schema) is sent
through each way, interleaved in rounds so that all see the same background
load, and the event-loop thread's CPU time (``time.thread_time``) is taken
around each request: waiting for a core, the endpoint or the network is not
counted. Rows, from most to least work on our side:

- ``sdk create()``: the SDK's typed ``chat.completions.create``: request
  transformation, httpx2's default transport, the reply parsed into pydantic
  models.
- ``LLMClient.complete``: what the orchestrator does (prepared body, the SDK's
  ``client.post`` on an ``httpx2`` pool, the reply read as JSON).
- ``httpx2, default transport``: a bare ``AsyncClient.post`` of the same bytes,
  without the SDK.
- ``raw HTTP/1.1``: the floor's client, one asyncio stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx2
import openai

from heist_common.config import LLMConfig
from heist_common.tools.registry import ToolRegistry
from orchestrator.llm.client import LLMClient
from tests.bench.http_llm import HttpLLM
from tests.bench.http_turns import RawHTTP

MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are the crew's hacker. You read the intelligence documents. " * 4},
    *(
        {"role": "user", "content": f"[turn {n}] planner: step {n} of the plan, the guards change at {n}:00."}
        for n in range(8)
    ),
]
"""A chat/native request as a crew agent sends it mid-session."""


async def measure(llm: HttpLLM, requests: int, rounds: int = 10) -> dict[str, dict[str, float]]:
    """Median and mean CPU microseconds per request for each way of sending it."""
    tools = ToolRegistry.for_services(["file_reader"]).functions_for(("file_reader",))
    client = LLMClient(LLMConfig(base_url=llm.base_url, model="bench", max_tokens=60, max_retries=0))
    sdk = openai.AsyncOpenAI(base_url=llm.base_url, api_key="bench", max_retries=0, timeout=60)
    default = httpx2.AsyncClient(timeout=60)
    raw = RawHTTP(llm.base_url, "bench")
    body = json.dumps({"model": "bench", "messages": MESSAGES, "tools": tools, "tool_choice": "auto"}).encode()
    url = llm.base_url + "/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": "Bearer bench"}

    async def via_create() -> None:
        await sdk.chat.completions.create(
            model="bench",
            messages=MESSAGES,
            tools=tools,
            tool_choice="auto",
            temperature=0.7,
            max_tokens=60,  # type: ignore[arg-type]
        )

    async def via_llm_client() -> None:
        await client.complete(MESSAGES, tools)

    async def via_default() -> None:
        json.loads((await default.post(url, content=body, headers=headers)).content)

    async def via_raw() -> None:
        json.loads(await raw.post("/v1/chat/completions", body))

    ways: dict[str, Callable[[], Awaitable[None]]] = {
        "sdk create()": via_create,
        "LLMClient.complete": via_llm_client,
        "httpx2, default transport": via_default,
        "raw HTTP/1.1": via_raw,
    }
    samples: dict[str, list[float]] = {name: [] for name in ways}
    per_round = max(1, requests // rounds)
    try:
        for round_ in range(rounds + 1):  # round 0 warms up
            for name, send in ways.items():
                for _ in range(per_round):
                    started = time.thread_time()
                    await send()
                    if round_:
                        samples[name].append((time.thread_time() - started) * 1e6)
    finally:
        await client.close()
        await sdk.close()
        await default.aclose()
        await raw.close()
    return {
        name: {"median_us": round(statistics.median(values)), "mean_us": round(statistics.fmean(values))}
        for name, values in samples.items()
    }


def llm_requests(llm: HttpLLM, requests: int) -> dict[str, dict[str, float]]:
    """Run :func:`measure` on its own event loop."""
    return asyncio.run(measure(llm, requests))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.llm_requests", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per way (default 300)")
    args = parser.parse_args()
    with HttpLLM() as llm:
        for name, row in llm_requests(llm, args.requests).items():
            print(f"{name:28s} CPU per request: median {row['median_us']:6d} us, mean {row['mean_us']:6d} us")


if __name__ == "__main__":
    main()
