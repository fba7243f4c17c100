"""LLMClient's prepared requests reach the server exactly as the SDK's ``create()`` would have sent them.

``LLMClient`` serializes request bodies itself and posts them with the SDK's
``client.post`` (so the SDK does not walk every message and tool schema on every
call). These tests send the same request both ways to the scripted endpoint and
compare what arrived: the raw body bytes and the headers.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest

from heist_common.config import LLMConfig
from orchestrator.llm.client import LLMClient, LLMError
from tests.support.config import write_heist_config
from tests.support.scripted_llm import RecordedRequest, ScriptedLLM, text, tool_call

REPO = Path(__file__).resolve().parents[2]
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "calculator_evaluate",
            "description": "Evaluate an arithmetic expression",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string", "description": "e.g. (120 - 15) * 3 / 7"}},
                "required": ["expression"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "file_reader_list_files",
            "description": "List the documents",
            "parameters": {"type": "object", "properties": {}, "required": [], "additionalProperties": False},
        },
    },
]
MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": 'You plan a heist. Say "go" \\ or wait.\nNo tabs\there.'},
    {"role": "user", "content": "[turn 1] planner: Café at 9 — ünïcödé ✓, 1e3 ≠ 1000?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "calculator_evaluate", "arguments": '{"x":1}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"value":315.0}'},
]
EXTRAS: dict[str, Any] = {"repeat_penalty": 1.3, "top_k": 40, "top_p": 0.9, "stop": ["END"]}
VARYING_HEADERS = {"content-length"}
"""Headers allowed to differ between the two ways (none should, apart from the length of a differing body)."""


def llm_config(base_url: str, **extra: Any) -> LLMConfig:
    return LLMConfig(base_url=base_url, model="wire-model", temperature=0.7, max_tokens=60, max_retries=0, **extra)


def sdk_client(config: LLMConfig) -> openai.AsyncOpenAI:
    """The SDK client as LLMClient configured it before it prepared its own requests."""
    return openai.AsyncOpenAI(
        base_url=config.base_url, api_key=config.api_key, timeout=config.timeout_s, max_retries=config.max_retries
    )


async def reference_chat(config: LLMConfig, tools: list[dict[str, Any]] | None, final: bool) -> None:
    """The request as the SDK's typed ``create()`` sends it (how LLMClient called it before)."""
    kwargs: dict[str, Any] = {}
    if tools:
        kwargs["tools"] = tools
        kwargs["tool_choice"] = "none" if final else "auto"
    if config.extra_body:
        kwargs["extra_body"] = config.extra_body
    async with sdk_client(config) as client:
        await client.chat.completions.create(
            model=config.model,
            messages=MESSAGES,  # type: ignore[arg-type]
            temperature=config.temperature,
            max_tokens=config.max_tokens,
            **kwargs,
        )


async def reference_text(config: LLMConfig, prompt: str, boost: float, seed: int) -> None:
    extra = {key: value for key, value in config.extra_body.items() if key != "stop"}
    async with sdk_client(config) as client:
        await client.completions.create(
            model=config.model,
            prompt=prompt,
            temperature=min(config.temperature + boost, 2.0),
            seed=seed,
            max_tokens=config.max_tokens,
            stop=["\n", *config.stop][:4],
            extra_body=extra or None,
        )


def assert_same_request(ours: RecordedRequest, reference: RecordedRequest) -> None:
    assert ours.path == reference.path
    assert ours.raw == reference.raw  # the very same bytes: keys, key order, separators, escapes
    assert ours.body == reference.body
    ours_headers = {k.lower(): v for k, v in ours.headers.items() if k.lower() not in VARYING_HEADERS}
    reference_headers = {k.lower(): v for k, v in reference.headers.items() if k.lower() not in VARYING_HEADERS}
    assert ours_headers == reference_headers


@pytest.mark.parametrize("extras", [{}, EXTRAS], ids=["plain", "extra_body"])
@pytest.mark.parametrize(
    ("tools", "final"), [(None, False), (TOOLS, False), (TOOLS, True)], ids=["none", "auto", "final"]
)
def test_chat_request_is_byte_identical_to_create(
    scripted_llm: ScriptedLLM, extras: dict[str, Any], tools: list[dict[str, Any]] | None, final: bool
) -> None:
    config = llm_config(scripted_llm.base_url, prompt_style="chat", **extras)

    async def both() -> None:
        await reference_chat(config, tools, final)
        client = LLMClient(config)
        try:
            await client.complete(MESSAGES, tools, final=final)
        finally:
            await client.close()

    asyncio.run(both())
    reference, ours = scripted_llm.requests
    assert_same_request(ours, reference)
    assert ("tools" in ours.body) is bool(tools)  # type: ignore[operator]


@pytest.mark.parametrize("extras", [{}, EXTRAS], ids=["plain", "extra_body"])
def test_text_request_is_byte_identical_to_create(
    scripted_llm: ScriptedLLM, extras: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = llm_config(scripted_llm.base_url, prompt_style="transcript", **extras)
    monkeypatch.setattr("orchestrator.llm.client.random.randrange", lambda _: 1234567)
    prompt = 'planner: "Café" at 9 — ✓\\nhacker: [TOOL:file_reader:'

    async def both() -> None:
        await reference_text(config, prompt, 0.6, 1234567)
        client = LLMClient(config)
        try:
            await client.complete_text(prompt, temperature_boost=0.6)
        finally:
            await client.close()

    asyncio.run(both())
    reference, ours = scripted_llm.requests
    assert_same_request(ours, reference)


def test_replies_are_read_like_the_sdk_read_them(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script(tool_call("calculator_evaluate", expression="2+3"), text("  Done.  "))
    config = llm_config(scripted_llm.base_url, prompt_style="chat")

    async def ask() -> tuple[Any, Any]:
        client = LLMClient(config)
        try:
            return await client.complete(MESSAGES, TOOLS), await client.complete(MESSAGES, TOOLS, final=True)
        finally:
            await client.close()

    first, second = asyncio.run(ask())
    assert [(c.name, c.arguments) for c in first.tool_calls] == [("calculator_evaluate", '{"expression": "2+3"}')]
    assert first.tool_calls[0].call_id.startswith("call_") and first.content == ""
    assert second.content == "Done." and second.tool_calls == [] and second.latency_ms > 0


def test_a_reply_that_is_not_a_completion_is_bad_response(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.responder = lambda _: text("ignored")
    config = llm_config(scripted_llm.base_url, prompt_style="chat")
    original = scripted_llm.completion_body
    scripted_llm.completion_body = lambda reply, model: {"object": "chat.completion", "choices": []}  # type: ignore[method-assign]

    async def ask() -> None:
        client = LLMClient(config)
        try:
            await client.complete(MESSAGES)
        finally:
            await client.close()

    try:
        with pytest.raises(LLMError) as raised:
            asyncio.run(ask())
    finally:
        scripted_llm.completion_body = original  # type: ignore[method-assign]
    assert raised.value.status_code == "BAD_RESPONSE" and "no choices" in raised.value.detail


def test_health_probe_is_a_one_token_completion_without_importing_openai(
    tmp_path: Path, scripted_llm: ScriptedLLM
) -> None:
    """``orchestrator health`` probes the LLM over plain HTTP: the ``openai`` package (~1 s to import) stays out."""
    path = write_heist_config(tmp_path, llm_base_url=scripted_llm.base_url, transport="plaintext")
    code = (
        "import sys; from orchestrator.cli import main; code = main(['--config', sys.argv[1], 'health']); "
        "print('openai imported' if 'openai' in sys.modules else 'openai not imported'); sys.exit(0)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert "openai not imported" in completed.stdout
    assert any(line.startswith("llm ") and "SERVING" in line for line in completed.stdout.splitlines())
    probes = scripted_llm.probe_requests
    assert len(probes) == 1 and probes[0]["max_tokens"] == 1 and probes[0]["model"]
    probe = next(r for r in scripted_llm.requests if r.probe)
    assert probe.headers.get("Authorization", "").startswith("Bearer ")


@pytest.mark.parametrize("status", [500, 200])
def test_health_probe_down_when_the_endpoint_cannot_complete(scripted_llm: ScriptedLLM, status: int) -> None:
    scripted_llm.probe_status = status
    if status == 200:  # up, but what it returns is not a completion
        scripted_llm.completion_body = lambda reply, model: {"error": "no model loaded"}  # type: ignore[method-assign]
    config = llm_config(scripted_llm.base_url, prompt_style="chat")

    async def probe() -> Any:
        client = LLMClient(config)
        try:
            return await client.check_health(2.0)
        finally:
            await client.close()

    result = asyncio.run(probe())
    assert result.status == "DOWN"
    assert ("HTTP 500: cannot complete" if status == 500 else "not a completion") in result.detail


def test_per_request_grammar_and_max_tokens_are_byte_identical_to_create(
    scripted_llm: ScriptedLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A constrained argument's request (``grammar`` and a larger ``max_tokens``) as ``create()`` would send it."""
    config = llm_config(scripted_llm.base_url, prompt_style="transcript", **EXTRAS)
    monkeypatch.setattr("orchestrator.llm.client.random.randrange", lambda _: 7654321)
    prompt = "hacker: [TOOL:file_reader:"
    grammar = {"grammar": 'root ::= "vault.md]"'}

    async def both() -> None:
        extra = {key: value for key, value in config.extra_body.items() if key != "stop"}
        async with sdk_client(config) as sdk:
            await sdk.completions.create(
                model=config.model, prompt=prompt, temperature=config.temperature, seed=7654321, max_tokens=150,
                stop=["\n", *config.stop][:4], extra_body={**extra, **grammar},
            )  # fmt: skip
        client = LLMClient(config)
        try:
            await client.complete_text(prompt, extra_body=grammar, max_tokens=150)
        finally:
            await client.close()

    asyncio.run(both())
    reference, ours = scripted_llm.requests
    assert_same_request(ours, reference)
    assert ours.body["grammar"] == grammar["grammar"] and ours.body["max_tokens"] == 150  # type: ignore[index]
