"""What LLMClient's requests look like when they reach a real HTTP server, and how it reads the replies.

``LLMClient`` serializes request bodies itself and posts them with the SDK's
public ``client.post`` (so the SDK does not walk every message and tool schema
on every call). These tests look at what arrives at the scripted endpoint (a
real HTTP server on 127.0.0.1): the path, every body field, the headers (auth,
the SDK's own, ``traceparent``), and check that the body carries the same
fields ``create()`` sends for the same request.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id

from heist_common.config import LLMConfig
from orchestrator.llm.client import LLMClient, LLMError
from orchestrator.tracing import turn_scope
from tests.support.config import write_heist_config
from tests.support.ports import free_port
from tests.support.scripted_llm import RecordedRequest, ScriptedLLM, hang, http_error, text, tool_call

REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk-wire-test-key"
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


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LLMConfig().api_key_env, API_KEY)


def llm_config(base_url: str, **extra: Any) -> LLMConfig:
    fields: dict[str, Any] = {"model": "wire-model", "temperature": 0.7, "max_tokens": 60, "max_retries": 0}
    return LLMConfig(base_url=base_url, **(fields | extra))


def headers_of(request: RecordedRequest) -> dict[str, str]:
    return {name.lower(): value for name, value in request.headers.items()}


def assert_sdk_headers(request: RecordedRequest, retry_count: str = "0") -> None:
    """The headers the SDK puts on every request of its own: auth, JSON, its user agent, its retry count."""
    headers = headers_of(request)
    assert headers["authorization"] == f"Bearer {API_KEY}"
    assert headers["content-type"] == "application/json"
    assert headers["accept"] == "application/json"
    assert headers["user-agent"].startswith("AsyncOpenAI/Python ")
    assert headers["x-stainless-retry-count"] == retry_count
    assert int(headers["content-length"]) == len(request.raw)


def run(coroutine_fn: Any, config: LLMConfig) -> Any:
    """Run ``coroutine_fn(client)`` with a fresh LLMClient, closed afterwards."""

    async def go() -> Any:
        client = LLMClient(config)
        try:
            return await coroutine_fn(client)
        finally:
            await client.close()

    return asyncio.run(go())


async def create_chat(config: LLMConfig, tools: list[dict[str, Any]] | None, final: bool) -> None:
    """The same request through the SDK's typed ``create()``, for comparison."""
    kwargs: dict[str, Any] = {}
    if tools:
        kwargs["tools"] = tools
        kwargs["tool_choice"] = "none" if final else "auto"
    if config.extra_body:
        kwargs["extra_body"] = config.extra_body
    async with openai.AsyncOpenAI(base_url=config.base_url, api_key=config.api_key, max_retries=0) as client:
        await client.chat.completions.create(
            model=config.model,
            messages=MESSAGES,  # type: ignore[arg-type]
            temperature=config.temperature,
            max_tokens=config.max_tokens,
            **kwargs,
        )


@pytest.mark.parametrize("extras", [{}, EXTRAS], ids=["plain", "extra_body"])
@pytest.mark.parametrize(
    ("tools", "final"), [(None, False), (TOOLS, False), (TOOLS, True)], ids=["none", "auto", "final"]
)
def test_chat_request_on_the_wire(
    scripted_llm: ScriptedLLM, extras: dict[str, Any], tools: list[dict[str, Any]] | None, final: bool
) -> None:
    config = llm_config(scripted_llm.base_url, prompt_style="chat", **extras)
    run(lambda client: client.complete(MESSAGES, tools, final=final), config)
    asyncio.run(create_chat(config, tools, final))

    ours, created = scripted_llm.requests
    assert (ours.method, ours.path) == ("POST", "/v1/chat/completions")
    expected: dict[str, Any] = {"model": "wire-model", "messages": MESSAGES, "max_tokens": 60, "temperature": 0.7}
    if tools:
        expected |= {"tools": TOOLS, "tool_choice": "none" if final else "auto"}
    assert ours.body == expected | extras
    assert_sdk_headers(ours)
    assert "traceparent" not in headers_of(ours)  # outside a turn there is no trace to join
    assert ours.body == created.body and ours.path == created.path


@pytest.mark.parametrize("extras", [{}, EXTRAS], ids=["plain", "extra_body"])
def test_text_request_on_the_wire(
    scripted_llm: ScriptedLLM, extras: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = llm_config(scripted_llm.base_url, prompt_style="transcript", **extras)
    monkeypatch.setattr("orchestrator.llm.client.random.randrange", lambda _: 1234567)
    prompt = 'planner: "Café" at 9 — ✓\\nhacker: [TOOL:file_reader:'
    run(lambda client: client.complete_text(prompt, temperature_boost=0.5), config)

    (ours,) = scripted_llm.requests
    assert (ours.method, ours.path) == ("POST", "/v1/completions")
    sampling = {key: value for key, value in extras.items() if key != "stop"}
    assert ours.body == {
        "model": "wire-model",
        "prompt": prompt,
        "max_tokens": 60,
        "seed": 1234567,
        "stop": ["\n", "END"] if extras else ["\n"],  # the config's stop joins the newline, not the extras
        "temperature": 1.2,
        **sampling,
    }
    assert_sdk_headers(ours)

    async def created() -> None:
        async with openai.AsyncOpenAI(base_url=config.base_url, api_key=config.api_key, max_retries=0) as client:
            await client.completions.create(
                model=config.model, prompt=prompt, temperature=1.2, seed=1234567, max_tokens=60,
                stop=["\n", *config.stop][:4], extra_body=sampling or None,
            )  # fmt: skip

    asyncio.run(created())
    assert scripted_llm.requests[1].body == ours.body


def test_per_request_grammar_and_max_tokens(scripted_llm: ScriptedLLM) -> None:
    """A constrained argument's request: its ``grammar`` joins the config's extras, its ``max_tokens`` wins."""
    config = llm_config(scripted_llm.base_url, prompt_style="transcript", **EXTRAS)
    grammar = 'root ::= "vault.md]"'
    run(lambda client: client.complete_text("hacker: [TOOL:file_reader:", extra_body={"grammar": grammar},
                                            max_tokens=150), config)  # fmt: skip
    body = scripted_llm.text_requests[0]
    assert body["grammar"] == grammar and body["max_tokens"] == 150
    assert body["top_k"] == 40 and body["repeat_penalty"] == 1.3 and body["stop"] == ["\n", "END"]


def test_a_traced_turns_requests_carry_their_spans_traceparent(scripted_llm: ScriptedLLM) -> None:
    """Tracing on: each request is a CLIENT span of the turn, and its ``traceparent`` reaches the model server."""
    scripted_llm.script(text("go"), tool_call("calculator_evaluate", expression="1+1"), http_error(503, "busy"))
    config = llm_config(scripted_llm.base_url, prompt_style="chat")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def turn(client: LLMClient) -> tuple[str, list[tuple[str, str, str]], str]:
        with turn_scope(provider.get_tracer("test"), "heist_wire", "planner", 1) as scope:
            await client.complete_text("planner:")
            await client.complete(MESSAGES, TOOLS)
            with pytest.raises(LLMError) as failed:
                await client.complete(MESSAGES)
            steps = [(step.kind, step.name, step.code) for step in scope.steps]
            return scope.trace_id, steps, failed.value.status_code

    trace_id, steps, status = run(turn, config)
    provider.shutdown()
    assert status == "HTTP 503"
    assert steps == [("llm", "completions", "OK"), ("llm", "chat.completions", "OK"),
                     ("llm", "chat.completions", "HTTP 503")]  # fmt: skip
    spans = [span for span in exporter.get_finished_spans() if span.kind is SpanKind.CLIENT]
    assert [span.name for span in spans] == ["text_completion wire-model", "chat wire-model", "chat wire-model"]
    sent = [headers_of(request).get("traceparent") for request in scripted_llm.requests]
    assert sent == [
        f"00-{trace_id}-{format_span_id(span.context.span_id)}-{span.context.trace_flags:02x}" for span in spans
    ]
    assert spans[0].attributes is not None and spans[0].attributes["gen_ai.usage.output_tokens"] == 1
    assert [span.status.status_code for span in spans] == [StatusCode.UNSET, StatusCode.UNSET, StatusCode.ERROR]


def test_untraced_requests_send_no_traceparent(scripted_llm: ScriptedLLM) -> None:
    """Tracing off: no span, so nothing for a model server to join (the turn's ID stays on the gRPC calls)."""
    config = llm_config(scripted_llm.base_url, prompt_style="transcript")

    async def turn(client: LLMClient) -> list[tuple[str, str, str]]:
        with turn_scope(None, "heist_wire", "planner", 1) as scope:
            await client.complete_text("planner:")
            return [(step.kind, step.name, step.code) for step in scope.steps]

    assert run(turn, config) == [("llm", "completions", "OK")]
    assert "traceparent" not in headers_of(scripted_llm.requests[0])


def test_the_sdk_retries_with_the_same_body_and_its_retry_count(scripted_llm: ScriptedLLM) -> None:
    """A 500 is retried by the SDK (``max_retries: 1``), same body, ``x-stainless-retry-count`` 0 then 1."""
    scripted_llm.script(http_error(500, "warming up"), text("the vault opens at nine"))
    config = llm_config(scripted_llm.base_url, prompt_style="transcript", max_retries=1)
    assert run(lambda client: client.complete_text("planner:"), config).content == "the vault opens at nine"
    first, second = scripted_llm.requests
    assert first.raw == second.raw
    assert_sdk_headers(first, "0")
    assert_sdk_headers(second, "1")


def test_no_retries_left_is_the_status_the_server_gave(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script(http_error(503, "overloaded"))
    config = llm_config(scripted_llm.base_url, prompt_style="transcript")
    with pytest.raises(LLMError) as failure:
        run(lambda client: client.complete_text("planner:"), config)
    assert failure.value.status_code == "HTTP 503"
    assert failure.value.detail == "overloaded"
    assert len(scripted_llm.requests) == 1


def test_timeouts_and_unreachable_endpoints_are_llm_errors(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script(hang(5))
    slow = llm_config(scripted_llm.base_url, prompt_style="chat", timeout_s=0.3)
    with pytest.raises(LLMError) as timed_out:
        run(lambda client: client.complete(MESSAGES), slow)
    assert timed_out.value.status_code == "TIMEOUT" and timed_out.value.latency_ms >= 300

    nowhere = llm_config(f"http://127.0.0.1:{free_port()}/v1", prompt_style="chat")
    with pytest.raises(LLMError) as unreachable:
        run(lambda client: client.complete(MESSAGES), nowhere)
    assert unreachable.value.status_code == "UNAVAILABLE" and "cannot reach" in unreachable.value.detail


def test_probe_and_requests_share_one_connection(scripted_llm: ScriptedLLM) -> None:
    """The health probe (plain httpx2) and the SDK's requests use one pool: the first turn reuses the probe's socket."""
    scripted_llm.script(tool_call("calculator_evaluate", expression="1+1"))
    config = llm_config(scripted_llm.base_url, prompt_style="chat")

    async def session(client: LLMClient) -> Any:
        assert (await client.check_health(2.0)).ok
        first = await client.complete(MESSAGES, TOOLS)
        await client.complete(MESSAGES)
        await client.complete_text("planner:")
        return first

    first = run(session, config)
    assert first.tool_calls[0].name == "calculator_evaluate"
    assert [r.path for r in scripted_llm.requests] == ["/v1/chat/completions"] * 3 + ["/v1/completions"]
    assert len({r.peer for r in scripted_llm.requests}) == 1


def test_replies_are_read_like_the_sdk_read_them(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script(tool_call("calculator_evaluate", expression="2+3"), text("  Done.  "))
    config = llm_config(scripted_llm.base_url, prompt_style="chat")

    async def ask(client: LLMClient) -> tuple[Any, Any]:
        return await client.complete(MESSAGES, TOOLS), await client.complete(MESSAGES, TOOLS, final=True)

    first, second = run(ask, config)
    assert [(c.name, c.arguments) for c in first.tool_calls] == [("calculator_evaluate", '{"expression": "2+3"}')]
    assert first.tool_calls[0].call_id.startswith("call_") and first.content == ""
    assert second.content == "Done." and second.tool_calls == [] and second.latency_ms > 0


def test_a_reply_that_is_not_a_completion_is_bad_response(scripted_llm: ScriptedLLM) -> None:
    config = llm_config(scripted_llm.base_url, prompt_style="chat")
    original = scripted_llm.completion_body
    scripted_llm.completion_body = lambda reply, model: {"object": "chat.completion", "choices": []}  # type: ignore[method-assign]
    try:
        with pytest.raises(LLMError) as raised:
            run(lambda client: client.complete(MESSAGES), config)
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
    assert headers_of(probe)["authorization"] == f"Bearer {API_KEY}"


@pytest.mark.parametrize("status", [500, 200])
def test_health_probe_down_when_the_endpoint_cannot_complete(scripted_llm: ScriptedLLM, status: int) -> None:
    scripted_llm.probe_status = status
    if status == 200:  # up, but what it returns is not a completion
        scripted_llm.completion_body = lambda reply, model: {"error": "no model loaded"}  # type: ignore[method-assign]
    config = llm_config(scripted_llm.base_url, prompt_style="chat")
    result = run(lambda client: client.check_health(2.0), config)
    assert result.status == "DOWN"
    assert ("HTTP 500: cannot complete" if status == 500 else "not a completion") in result.detail
