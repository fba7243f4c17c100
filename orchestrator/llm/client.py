"""The OpenAI-compatible LLM endpoint (embedded llama.cpp server, LM Studio, Ollama, vLLM, OpenAI).

Requests go through the ``openai`` client's public API, so its timeouts,
retries, auth and error types are the ones we use; this module turns its
exceptions into one ``LLMError`` with a status the audit can group by.

Why ``client.post`` rather than ``create()``: the SDK documents
``client.post(path, cast_to=httpx2.Response, ...)`` for requests made outside
its typed methods, with the client's options (retries, timeouts, auth)
respected. ``create()`` walks every message and tool schema against its typed
parameter definitions on every call, which costs more CPU than the rest of a
zero-latency turn (docs/performance.md), and parses each reply into pydantic
models. Our messages and tool schemas are already plain wire dicts, so the
body is serialized here with the keys ``create()`` would send and the reply is
read as JSON.

Why ``openai`` is imported on first use: importing it is slow (its ``types``
package: docs/performance.md), and commands that never complete anything (``health``,
the inspection commands) must not pay that. The health probe is a plain
``httpx2`` request on the same connection pool the SDK then uses (``httpx2`` is
the HTTP client the pinned ``openai`` is built on; its ``http_client`` must be
an ``httpx2.AsyncClient``).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx2

from heist_common.config import LLMConfig
from orchestrator.llm.usage import TokenMeter, Usage, read_usage
from orchestrator.mesh.clients import HealthResult
from orchestrator.tracing import TurnScope, current_turn, elapsed_ms, end_span

if TYPE_CHECKING:
    import openai
    from opentelemetry.metrics import Meter
    from opentelemetry.trace import Span

__all__ = [
    "LLM_DOWN",
    "PROBE_HEADER",
    "Completion",
    "LLMClient",
    "LLMError",
    "NativeToolCall",
]

PROBE_HEADER = "x-heist-probe"
"""Marks the one-token health probe, so logs (and the scripted test endpoint) can tell it from a turn."""
LLM_DOWN = "DOWN"
"""Health status of an LLM endpoint that cannot complete (unreachable, erroring or too slow)."""

CONNECTION_LIMITS = httpx2.Limits(max_connections=1000, max_keepalive_connections=100)
"""The ``openai`` client's own default pool limits (``openai.DefaultAsyncHttpx2Client``); we hand it our pool."""

CHAT_PATH = "/chat/completions"
TEXT_PATH = "/completions"
"""The two endpoints, relative to ``base_url`` (the SDK joins them)."""

MAX_SERIALIZED_TOOL_LISTS = 64
"""Bound on the per-client cache of serialized ``tools`` lists (a few per agent; a new one per changed listing)."""

_to_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
"""Compact UTF-8 JSON, built once (the SDK serializes its own bodies the same way)."""


class LLMError(Exception):
    """The LLM call failed; ``status_code`` is e.g. ``HTTP 500``, ``TIMEOUT`` or ``UNAVAILABLE``."""

    def __init__(self, status_code: str, detail: str, latency_ms: float) -> None:
        super().__init__(f"{status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail
        self.latency_ms = latency_ms


@dataclass(frozen=True, slots=True)
class NativeToolCall:
    """One OpenAI ``tool_calls`` entry."""

    call_id: str
    name: str
    arguments: str


@dataclass(slots=True)
class Completion:
    """What the model said: text and/or native tool calls."""

    content: str
    tool_calls: list[NativeToolCall] = field(default_factory=list)
    latency_ms: float = 0.0
    truncated: bool = False
    """The model ran out of ``max_tokens`` mid-reply."""
    usage: Usage = field(default_factory=Usage)
    """Tokens of the request and reply, as the server reported them or estimated (``llm.usage``)."""

    def assistant_message(self) -> dict[str, Any]:
        """Build the assistant turn to send back before the tool results (OpenAI protocol)."""
        return {
            "role": "assistant",
            # "", not null: llama.cpp's server refuses null (HTTP 500); OpenAI and vLLM accept either.
            "content": self.content,
            "tool_calls": [
                {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ],
        }


def _json_object(fields: dict[str, str]) -> bytes:
    """Join already serialized values into a JSON object, byte for byte what ``_to_json`` of the dict gives."""
    return ("{" + ",".join(f"{_to_json(key)}:{value}" for key, value in fields.items()) + "}").encode()


class LLMClient:
    """One ``openai.AsyncOpenAI`` client configured from the ``llm`` section, one HTTP pool per run."""

    def __init__(self, config: LLMConfig, *, meter: Meter | None = None) -> None:
        """``meter``: where the ``gen_ai.client.token.usage`` histogram goes (None: no OpenTelemetry metrics)."""
        self.config = config
        self.http = httpx2.AsyncClient(timeout=config.timeout_s, limits=CONNECTION_LIMITS, follow_redirects=True)
        """One connection pool, the probe's and the SDK's (``http_client``): turns reuse the probe's connection."""
        self._client: openai.AsyncOpenAI | None = None
        extra = {key: _to_json(value) for key, value in config.extra_body.items()}
        # Fields that are the same in every request, serialized once, in the order create() sends them.
        self._chat_sampling = {"max_tokens": _to_json(config.max_tokens), "temperature": _to_json(config.temperature)}
        self._chat_extra = extra
        self._text_extra = {key: value for key, value in extra.items() if key != "stop"}
        self._model = _to_json(config.model)
        self._stop = _to_json(["\n", *config.stop][:4])
        self._max_tokens = _to_json(config.max_tokens)
        self._tools_json: dict[int, tuple[list[dict[str, Any]], str]] = {}
        """Serialized ``tools`` lists by identity (each agent sends the same list object turn after turn)."""
        parts = urlsplit(config.base_url)
        self._server = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
        self.tokens = TokenMeter(
            config.model,
            meter,
            {
                "gen_ai.provider.name": "openai",
                "gen_ai.request.model": config.model,
                "server.address": self._server[0],
                "server.port": self._server[1],
            },
        )
        """Every request's tokens, per agent: the Prometheus counter and the OpenTelemetry histogram."""

    @property
    def client(self) -> openai.AsyncOpenAI:
        """The SDK client (``openai`` is imported the first time it is needed)."""
        if self._client is None:
            import openai

            self._client = openai.AsyncOpenAI(
                base_url=self.config.base_url,
                api_key=self.config.api_key,
                timeout=self.config.timeout_s,
                max_retries=self.config.max_retries,
                http_client=self.http,
            )
        return self._client

    def _begin(self, operation: str) -> tuple[TurnScope | None, Span | None, dict[str, str] | None]:
        """Return the current turn, a CLIENT span for one request under it (tracing on), and the headers that carry it.

        GenAI semantic conventions: span ``{operation} {model}``; a model server
        that speaks OpenTelemetry (vLLM does) joins the turn's trace.
        """
        turn = current_turn()
        if turn is None:
            return None, None, None
        span = turn.client_span(
            f"{operation} {self.config.model}",
            {
                "gen_ai.operation.name": operation,
                "gen_ai.provider.name": "openai",
                "gen_ai.request.model": self.config.model,
                "gen_ai.request.max_tokens": self.config.max_tokens,
                "gen_ai.request.temperature": self.config.temperature,
                "server.address": self._server[0],
                "server.port": self._server[1],
            },
        )
        return turn, span, (dict(turn.outgoing(span)) if span is not None else None)

    async def complete(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        *,
        final: bool = False,
        extra_body: Mapping[str, Any] | None = None,
        tool_choice: Mapping[str, Any] | str | None = None,
        temperature_boost: float = 0.0,
    ) -> Completion:
        """One chat completion; ``final`` forbids further tool calls. LLMError on any failure.

        ``tool_choice`` (with ``tools``, not ``final``) forces a call, e.g. ``"required"``.

        ``extra_body`` is merged over the config's sampling extras (e.g. a ``grammar``);
        ``temperature_boost`` is added to the configured temperature (a resample).
        """
        start = time.perf_counter()
        fields = {"model": self._model, "messages": _to_json(messages), **self._chat_sampling}
        if temperature_boost:
            fields["temperature"] = _to_json(min(self.config.temperature + temperature_boost, 2.0))
        if tools:
            fields["tool_choice"] = '"none"' if final else _to_json(tool_choice) if tool_choice else '"auto"'
            fields["tools"] = self._serialized_tools(tools)
        fields.update(self._chat_extra)
        if extra_body:
            fields.update({key: _to_json(value) for key, value in extra_body.items()})
        data = await self._post(CHAT_PATH, _json_object(fields), start, "chat", "chat.completions")
        try:
            message = _first_choice(data)["message"]
            content = message.get("content") or ""
            calls = [
                NativeToolCall(call["id"], call["function"]["name"], _arguments(call["function"].get("arguments")))
                for call in message.get("tool_calls") or ()
                if call.get("type", "function") == "function"
            ]
            if not isinstance(content, str) or not all(isinstance(c.name, str) for c in calls):
                raise TypeError("content and function names must be strings")
        except (LookupError, TypeError, AttributeError) as exc:
            raise LLMError("BAD_RESPONSE", _short(f"unexpected reply: {exc!r}"), elapsed_ms(start)) from None
        # The estimate (no usage in the reply) counts the serialized messages and functions: what the server templates.
        sent = len(fields["messages"]) + len(fields.get("tools", ""))
        said = len(content) + sum(len(call.name) + len(call.arguments) for call in calls)
        usage = self._count(data, sent, said, "chat")
        return Completion(content=content.strip(), tool_calls=calls, latency_ms=elapsed_ms(start), usage=usage)

    def _count(self, data: Any, prompt_chars: int, completion_chars: int, operation: str) -> Usage:
        """Read (or estimate) one reply's usage and meter it for the current turn's agent."""
        usage = read_usage(data, prompt_chars, completion_chars)
        turn = current_turn()
        self.tokens.record(turn.agent if turn is not None else None, operation, usage)
        return usage

    def _serialized_tools(self, tools: list[dict[str, Any]]) -> str:
        """``tools`` as JSON, serialized once per list object (the lists are built once and never modified)."""
        known = self._tools_json.get(id(tools))
        if known is not None and known[0] is tools:
            return known[1]
        if len(self._tools_json) >= MAX_SERIALIZED_TOOL_LISTS:
            self._tools_json.clear()
        serialized = _to_json(tools)
        self._tools_json[id(tools)] = (tools, serialized)  # the list is kept, so its id is not reused
        return serialized

    async def complete_text(
        self,
        prompt: str,
        *,
        temperature_boost: float = 0.0,
        extra_body: Mapping[str, Any] | None = None,
        max_tokens: int | None = None,
    ) -> Completion:
        """Continue a plain-text prompt (``/completions``) up to the end of the line; LLMError on any failure.

        For ``prompt_style: transcript``: a base model continues "Speaker:" with one
        line, so a newline ends the turn. ``extra_body`` is merged over the config's
        sampling extras (e.g. a ``grammar``); ``max_tokens`` replaces the config's
        (a constrained argument needs room to be finished).
        """
        start = time.perf_counter()
        fields = {
            "model": self._model,
            "prompt": _to_json(prompt),
            "max_tokens": _to_json(max_tokens) if max_tokens else self._max_tokens,
            # llama.cpp's server samples with a fixed seed unless told otherwise,
            # which would make a resample return the very same line.
            "seed": str(random.randrange(2**31)),
            "stop": self._stop,
            "temperature": _to_json(min(self.config.temperature + temperature_boost, 2.0)),
            **self._text_extra,
        }
        if extra_body:
            fields.update({key: _to_json(value) for key, value in extra_body.items()})
        data = await self._post(TEXT_PATH, _json_object(fields), start, "text_completion", "completions")
        try:
            choice = _first_choice(data)
            text, finish_reason = choice["text"], choice.get("finish_reason")
            if not isinstance(text, str):
                raise TypeError(f"text is {type(text).__name__}")
        except (LookupError, TypeError, AttributeError) as exc:
            raise LLMError("BAD_RESPONSE", _short(f"unexpected reply: {exc!r}"), elapsed_ms(start)) from None
        usage = self._count(data, len(prompt), len(text), "text_completion")
        return Completion(
            content=text.strip(), latency_ms=elapsed_ms(start), truncated=finish_reason == "length", usage=usage
        )

    async def _post(self, path: str, body: bytes, start: float, operation: str, step: str) -> Any:
        """POST a prepared JSON body as one step of the current turn (and its span); return the decoded reply.

        Every failure is an LLMError; the turn records the step with its status either way.
        """
        turn, span, headers = self._begin(operation)
        code, detail = "OK", ""
        try:
            data = await self._send(path, body, start, headers)
        except LLMError as exc:
            code, detail = exc.status_code, exc.detail
            raise
        except BaseException:
            code = "CANCELLED"
            raise
        finally:
            if turn is not None:
                turn.record("llm", step, start, code)
            if code != "OK":
                end_span(span, code, detail)
        if span is not None:
            usage = data.get("usage") if isinstance(data, dict) else None
            if isinstance(usage, dict):
                span.set_attribute("gen_ai.usage.input_tokens", int(usage.get("prompt_tokens") or 0))
                span.set_attribute("gen_ai.usage.output_tokens", int(usage.get("completion_tokens") or 0))
            span.end()
        return data

    async def _send(self, path: str, body: bytes, start: float, headers: dict[str, str] | None) -> Any:
        """POST ``body`` to ``path`` (under ``base_url``) with ``client.post`` and decode the JSON reply.

        The SDK adds its headers and bearer auth (as ``create()`` asks for it), retries,
        applies the timeout and raises its error types, which are mapped to LLMError here.
        """
        client = self.client
        import openai  # already imported by ``client``

        options: openai.RequestOptions = {"security": {"bearer_auth": True}}
        if headers:
            options["headers"] = headers
        try:
            response = await client.post(path, cast_to=httpx2.Response, content=body, options=options)
            return json.loads(response.content)
        except openai.APITimeoutError as exc:
            raise LLMError("TIMEOUT", f"no reply within {self.config.timeout_s}s ({exc})", elapsed_ms(start)) from None
        except openai.APIStatusError as exc:
            detail = exc.message.split(" - ", 1)[1] if exc.message.startswith("Error code:") else exc.message
            raise LLMError(f"HTTP {exc.status_code}", _short(detail), elapsed_ms(start)) from None
        except openai.APIConnectionError as exc:
            raise LLMError("UNAVAILABLE", f"cannot reach {self.config.base_url}: {exc}", elapsed_ms(start)) from None
        except (openai.OpenAIError, ValueError) as exc:  # ValueError: the reply is not JSON
            raise LLMError("BAD_RESPONSE", _short(str(exc)), elapsed_ms(start)) from None

    async def check_health(self, timeout_s: float) -> HealthResult:
        """Ask for one token, with a short deadline and no retries: can the endpoint answer at all.

        ``GET /models`` is not enough: a llama.cpp server whose CPU backend
        crashes on the first matrix multiply lists its model happily. One token
        costs a few milliseconds on the embedded model and a fraction of a cent
        elsewhere, and it exercises the very endpoint the prompt style uses. It is
        a plain HTTP request (no ``openai`` import, see the module docstring).
        """
        start = time.perf_counter()
        config = self.config
        request: dict[str, Any] = {"model": config.model, "max_tokens": 1, "temperature": 0.0}
        if config.prompt_style == "transcript":
            path, request["prompt"] = TEXT_PATH, "OK"
        else:
            path, request["messages"] = CHAT_PATH, [{"role": "user", "content": "Say OK."}]
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {config.api_key}", PROBE_HEADER: "1"}
        try:
            response = await self.http.post(
                config.base_url + path, content=_to_json(request).encode(), headers=headers, timeout=timeout_s
            )
        except httpx2.TimeoutException:
            detail = f"no completion within {timeout_s:g}s"
            return HealthResult("llm", config.base_url, LLM_DOWN, elapsed_ms(start), detail)
        except httpx2.HTTPError as exc:
            detail = f"cannot reach {config.base_url}: {_short(str(exc) or type(exc).__name__, 160)}"
            return HealthResult("llm", config.base_url, LLM_DOWN, elapsed_ms(start), detail)
        if response.status_code >= 400:
            detail = f"completion failed: HTTP {response.status_code}: {_short(_error_message(response), 160)}"
            return HealthResult("llm", config.base_url, LLM_DOWN, elapsed_ms(start), detail)
        try:
            _first_choice(response.json())
        except (ValueError, LookupError, TypeError, AttributeError):
            detail = f"completion failed: not a completion: {_short(response.text, 160)}"
            return HealthResult("llm", config.base_url, LLM_DOWN, elapsed_ms(start), detail)
        return HealthResult("llm", config.base_url, "SERVING", elapsed_ms(start))

    async def close(self) -> None:
        """Close the HTTP connection pool (the SDK client's too)."""
        await self.http.aclose()


def _first_choice(data: Any) -> dict[str, Any]:
    """``choices[0]`` of a completion reply; LookupError/TypeError if the reply has none."""
    choices = data["choices"]
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise LookupError("reply has no choices")
    first: dict[str, Any] = choices[0]
    return first


def _arguments(value: object) -> str:
    """Return a tool call's arguments as JSON text (some servers send an object instead of a string)."""
    if isinstance(value, str):
        return value or "{}"
    return "{}" if value is None else _to_json(value)


def _error_message(response: httpx2.Response) -> str:
    """Return the ``error.message`` of an OpenAI-style error body, else the body text."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, LookupError, TypeError):
        return response.text.strip() or response.reason_phrase
    return str(message)


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
