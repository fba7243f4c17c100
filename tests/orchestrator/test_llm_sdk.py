"""The LLM client's SDK subclass builds the very request the SDK builds, once per shape, and keeps the SDK's retries."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx2
import openai
import pytest
from openai._models import FinalRequestOptions

from heist_common.config import LLMConfig
from orchestrator.llm.client import LLMClient, LLMError
from orchestrator.llm.sdk import PreparedRequestOpenAI
from tests.support.scripted_llm import ScriptedLLM, http_error, text

BASE_URL = "http://127.0.0.1:9/v1"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def options(**overrides: Any) -> FinalRequestOptions:
    """A request as ``LLMClient`` sends it: POST of prepared bytes to an absolute URL."""
    fields: dict[str, Any] = {
        "method": "post",
        "url": BASE_URL + "/completions",
        "content": b'{"model":"m","prompt":"planner: go"}',
        "security": {"bearer_auth": True},
        **overrides,
    }
    return FinalRequestOptions.construct(**fields)


def described(request: httpx2.Request) -> tuple[str, str, list[tuple[bytes, bytes]], bytes, dict[str, Any]]:
    """What goes on the wire (headers as a sorted multiset: their order carries no meaning) and the timeouts."""
    headers = sorted((name.lower(), value) for name, value in request.headers.raw)
    return request.method, str(request.url), headers, request.read(), dict(request.extensions)


@pytest.fixture
def clients() -> tuple[PreparedRequestOpenAI, openai.AsyncOpenAI]:
    kwargs: dict[str, Any] = {"base_url": BASE_URL, "api_key": "sk-test", "timeout": 12.5, "max_retries": 2}
    return PreparedRequestOpenAI(**kwargs), openai.AsyncOpenAI(**kwargs)


@pytest.mark.parametrize("retries_taken", [0, 1, 2])
@pytest.mark.parametrize(
    "shape",
    [
        {},
        {"headers": {"traceparent": TRACEPARENT}},
        {"idempotency_key": "stainless-python-retry-abc"},
        {"url": BASE_URL + "/chat/completions", "content": b'{"messages":[]}'},
    ],
    ids=["plain", "traceparent", "idempotency_key", "chat"],
)
def test_prepared_request_is_the_request_the_sdk_builds(
    clients: tuple[PreparedRequestOpenAI, openai.AsyncOpenAI], shape: dict[str, Any], retries_taken: int
) -> None:
    prepared, sdk = clients
    for body in (b'{"prompt":"first"}', b'{"prompt":"second, from the cached template \\u2713"}'):
        request_options = options(**{"content": body, **shape}) if "content" not in shape else options(**shape)
        ours = prepared._build_request(request_options, retries_taken=retries_taken)
        reference = sdk._build_request(request_options, retries_taken=retries_taken)
        assert described(ours) == described(reference)
    assert len(prepared._request_templates) == 1  # one template per URL and retry count, reused


def test_a_caller_header_that_replaces_one_of_the_sdks_takes_the_sdks_path(
    clients: tuple[PreparedRequestOpenAI, openai.AsyncOpenAI],
) -> None:
    prepared, sdk = clients
    replaced = options(headers={"Authorization": "Bearer other", "traceparent": TRACEPARENT})
    assert described(prepared._build_request(replaced)) == described(sdk._build_request(replaced))
    assert prepared._build_request(replaced).headers["authorization"] == "Bearer other"


def test_other_requests_take_the_sdks_own_path(clients: tuple[PreparedRequestOpenAI, openai.AsyncOpenAI]) -> None:
    prepared, sdk = clients
    for other in (
        options(content=None, json_data={"model": "m"}),
        options(method="get", url="/models", content=None),
        options(params={"limit": 3}),
        options(timeout=3.0),
    ):
        assert described(prepared._build_request(other)) == described(sdk._build_request(other))
    assert prepared._request_templates == {}


def test_the_sdks_retry_resends_the_body_with_its_retry_count(scripted_llm: ScriptedLLM) -> None:
    """A 500 is retried by the SDK (``max_retries: 1``), same body, ``x-stainless-retry-count`` 0 then 1."""
    scripted_llm.script(http_error(500, "warming up"), text("the vault opens at nine"))
    config = LLMConfig(base_url=scripted_llm.base_url, model="m", max_retries=1, prompt_style="transcript")

    async def complete() -> str:
        client = LLMClient(config)
        try:
            return (await client.complete_text("planner:")).content
        finally:
            await client.close()

    assert asyncio.run(complete()) == "the vault opens at nine"
    first, second = scripted_llm.requests
    assert first.raw == second.raw
    retry_counts = [{k.lower(): v for k, v in r.headers.items()}["x-stainless-retry-count"] for r in (first, second)]
    assert retry_counts == ["0", "1"]


def test_no_retries_left_is_the_status_the_server_gave(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script(http_error(503, "overloaded"))
    config = LLMConfig(base_url=scripted_llm.base_url, model="m", max_retries=0, prompt_style="transcript")

    async def complete() -> None:
        client = LLMClient(config)
        try:
            await client.complete_text("planner:")
        finally:
            await client.close()

    with pytest.raises(LLMError) as failure:
        asyncio.run(complete())
    assert failure.value.status_code == "HTTP 503"
    assert "overloaded" in failure.value.detail
    assert len(scripted_llm.requests) == 1
