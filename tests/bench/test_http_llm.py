"""The benchmark's HTTP endpoint speaks enough OpenAI API for the real ``openai`` client, and scripts turns right."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import openai
import pytest

from tests.bench.http_llm import ARGUMENTS, FUNCTION_ARGUMENTS, HttpLLM

TOOL = {"type": "function", "function": {"name": "calculator_evaluate", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def endpoint() -> Iterator[HttpLLM]:
    with HttpLLM(record=True) as llm:
        yield llm


def test_transcript_prefill_is_completed_with_the_tools_argument(endpoint: HttpLLM) -> None:
    async def ask() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=endpoint.base_url, api_key="x", max_retries=0) as client:
            marker = await client.completions.create(model="m", prompt="mole: [TOOL:database_query:", max_tokens=5)
            plain = await client.completions.create(model="m", prompt="planner: [TOOL:x:1] done.\nmole:", max_tokens=5)
            return marker.choices[0].text, plain.choices[0].text

    endpoint.reset()
    marker, plain = asyncio.run(ask())
    assert marker == f"{ARGUMENTS['database_query']}] done."
    assert "[TOOL:" not in plain and plain
    recorded = endpoint.recorded()
    assert [route for route, _ in recorded] == ["/v1/completions"] * 2
    assert json.loads(recorded[0][1])["prompt"] == "mole: [TOOL:database_query:"
    assert endpoint.stats()["completions"] == 2


def test_chat_with_tools_gets_a_tool_call_then_an_answer(endpoint: HttpLLM) -> None:
    async def ask() -> tuple[openai.types.chat.ChatCompletion, openai.types.chat.ChatCompletion]:
        async with openai.AsyncOpenAI(base_url=endpoint.base_url, api_key="x", max_retries=0) as client:
            first = await client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "go"}],
                tools=[TOOL],  # type: ignore[list-item]
            )
            call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
            second = await client.chat.completions.create(
                model="m",
                messages=[
                    {"role": "user", "content": "go"},
                    first.choices[0].message.model_dump(exclude_none=True),  # type: ignore[list-item]
                    {"role": "tool", "tool_call_id": call.id, "content": "315"},
                ],
                tools=[TOOL],  # type: ignore[list-item]
            )
            return first, second

    first, second = asyncio.run(ask())
    calls = first.choices[0].message.tool_calls or []
    assert len(calls) == 1 and first.choices[0].finish_reason == "tool_calls"
    assert calls[0].function.name == "calculator_evaluate"  # type: ignore[union-attr]
    assert json.loads(calls[0].function.arguments) == FUNCTION_ARGUMENTS["calculator_evaluate"]  # type: ignore[union-attr]
    assert not second.choices[0].message.tool_calls and second.choices[0].message.content


def test_probes_are_not_counted_and_replies_are_delayed() -> None:
    async def ask(llm: HttpLLM) -> tuple[float, float]:
        async with openai.AsyncOpenAI(base_url=llm.base_url, api_key="x", max_retries=0) as client:
            started = time.perf_counter()
            await client.completions.create(model="m", prompt="OK", max_tokens=1, extra_headers={"x-heist-probe": "1"})
            probe_s = time.perf_counter() - started
            started = time.perf_counter()
            await client.completions.create(model="m", prompt="hi", max_tokens=1)
            return probe_s, time.perf_counter() - started

    with HttpLLM(delay_ms=300) as llm:
        probe_s, turn_s = asyncio.run(ask(llm))
        stats = llm.stats()
    assert probe_s < 0.3 <= turn_s
    assert stats["requests"] == 2 and stats["completions"] == 1 and stats["first_completion_at"] is not None
