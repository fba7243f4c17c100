"""The OpenAI-compatible LLM endpoint (embedded llama.cpp server, LM Studio, Ollama, vLLM, OpenAI).

Timeouts and retries are the ``openai`` client's own; this module only turns
its exceptions into one ``LLMError`` with a status the audit can group by, and
parses the inline ``[TOOL:name:argument]`` convention for models that have no
native function calling.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import openai
from openai.types.chat import ChatCompletionMessageFunctionToolCall
from opentelemetry.trace import Span

from heist_common.config import LLMConfig
from orchestrator.clients import HealthResult
from orchestrator.tracing import TurnScope, current_turn, end_span

__all__ = [
    "INLINE_TOOL_PATTERN",
    "LLM_DOWN",
    "PROBE_HEADER",
    "Completion",
    "InlineToolCall",
    "LLMClient",
    "LLMError",
    "NativeToolCall",
]

INLINE_TOOL_PATTERN = re.compile(r"\[TOOL:\s*([A-Za-z_][\w-]*)\s*:\s*([^\]\n]*?)\s*\]")
"""``[TOOL:calculator:(120-15)*3]``: tool name, then the argument up to the closing bracket."""


PROBE_HEADER = "x-heist-probe"
"""Marks the one-token health probe, so logs (and the scripted test endpoint) can tell it from a turn."""
LLM_DOWN = "DOWN"
"""Health status of an LLM endpoint that cannot complete (unreachable, erroring or too slow)."""


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


@dataclass(frozen=True, slots=True)
class InlineToolCall:
    """One ``[TOOL:name:argument]`` marker found in a reply."""

    marker: str
    tool: str
    argument: str


@dataclass(slots=True)
class Completion:
    """What the model said: text and/or native tool calls."""

    content: str
    tool_calls: list[NativeToolCall] = field(default_factory=list)
    latency_ms: float = 0.0
    truncated: bool = False
    """The model ran out of ``max_tokens`` mid-reply."""

    def assistant_message(self) -> dict[str, Any]:
        """Build the assistant turn to send back before the tool results (OpenAI protocol)."""
        return {
            "role": "assistant",
            "content": self.content or None,
            "tool_calls": [
                {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ],
        }


T = TypeVar("T")


def find_inline_tool_calls(text: str) -> list[InlineToolCall]:
    """Every inline tool marker in ``text``, in order."""
    return [InlineToolCall(m.group(0), m.group(1), m.group(2)) for m in INLINE_TOOL_PATTERN.finditer(text)]


def _elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class LLMClient:
    """``openai.AsyncOpenAI`` configured from the ``llm`` section (one HTTP connection pool per run)."""

    def __init__(self, config: LLMConfig) -> None:
        self.config = config
        self.client = openai.AsyncOpenAI(
            base_url=config.base_url,
            api_key=config.api_key,
            timeout=config.timeout_s,
            max_retries=config.max_retries,
        )
        self._extra_body = config.extra_body or None
        parts = urlsplit(config.base_url)
        self._server = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))

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
    ) -> Completion:
        """One chat completion; ``final`` forbids further tool calls. LLMError on any failure.

        ``extra_body`` is merged over the config's sampling extras (e.g. a ``grammar``).
        """
        start = time.perf_counter()
        turn, span, headers = self._begin("chat")
        kwargs: dict[str, Any] = {"extra_headers": headers} if headers else {}
        if tools:
            kwargs["tools"] = tools
            kwargs["tool_choice"] = "none" if final else "auto"
        if self._extra_body or extra_body:
            kwargs["extra_body"] = {**(self._extra_body or {}), **(extra_body or {})}
        response = await self._request(
            self.client.chat.completions.create(
                model=self.config.model,
                messages=messages,  # type: ignore[arg-type]  # plain dicts are the wire format
                temperature=self.config.temperature,
                max_tokens=self.config.max_tokens,
                **kwargs,
            ),
            start,
            turn,
            span,
            "chat.completions",
        )
        if not response.choices:
            raise LLMError("BAD_RESPONSE", "reply has no choices", _elapsed_ms(start))
        message = response.choices[0].message
        calls = [
            NativeToolCall(call.id, call.function.name, call.function.arguments or "{}")
            for call in (message.tool_calls or [])
            if isinstance(call, ChatCompletionMessageFunctionToolCall)
        ]
        return Completion(content=(message.content or "").strip(), tool_calls=calls, latency_ms=_elapsed_ms(start))

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
        turn, span, headers = self._begin("text_completion")
        extra = {key: value for key, value in (self._extra_body or {}).items() if key != "stop"}
        extra.update(extra_body or {})
        response = await self._request(
            self.client.completions.create(
                model=self.config.model,
                prompt=prompt,
                temperature=min(self.config.temperature + temperature_boost, 2.0),
                # llama.cpp's server samples with a fixed seed unless told otherwise,
                # which would make a resample return the very same line.
                seed=random.randrange(2**31),
                max_tokens=max_tokens or self.config.max_tokens,
                stop=["\n", *self.config.stop][:4],
                extra_body=extra or None,
                extra_headers=headers,
            ),
            start,
            turn,
            span,
            "completions",
        )
        if not response.choices:
            raise LLMError("BAD_RESPONSE", "reply has no choices", _elapsed_ms(start))
        choice = response.choices[0]
        return Completion(
            content=choice.text.strip(), latency_ms=_elapsed_ms(start), truncated=choice.finish_reason == "length"
        )

    async def _request(
        self, request: Awaitable[T], start: float, turn: TurnScope | None, span: Span | None, name: str
    ) -> T:
        """Await one API request as a step of the turn (and its span); every failure becomes an LLMError."""
        code, detail = "OK", ""
        try:
            response = await self._send(request, start)
        except LLMError as exc:
            code, detail = exc.status_code, exc.detail
            raise
        except BaseException:
            code = "CANCELLED"
            raise
        finally:
            if turn is not None:
                turn.record("llm", name, start, code)
            if code != "OK":
                end_span(span, code, detail)
        if span is not None:
            usage = getattr(response, "usage", None)
            if usage is not None:
                span.set_attribute("gen_ai.usage.input_tokens", int(getattr(usage, "prompt_tokens", 0) or 0))
                span.set_attribute("gen_ai.usage.output_tokens", int(getattr(usage, "completion_tokens", 0) or 0))
            span.end()
        return response

    async def _send(self, request: Awaitable[T], start: float) -> T:
        """Await one API request, turning every client exception into an LLMError the audit can group by."""
        try:
            return await request
        except openai.APITimeoutError as exc:
            raise LLMError("TIMEOUT", f"no reply within {self.config.timeout_s}s ({exc})", _elapsed_ms(start)) from None
        except openai.APIStatusError as exc:
            detail = exc.message.split(" - ", 1)[1] if exc.message.startswith("Error code:") else exc.message
            raise LLMError(f"HTTP {exc.status_code}", _short(detail), _elapsed_ms(start)) from None
        except openai.APIConnectionError as exc:
            raise LLMError("UNAVAILABLE", f"cannot reach {self.config.base_url}: {exc}", _elapsed_ms(start)) from None
        except (openai.OpenAIError, ValueError, TypeError, KeyError) as exc:
            raise LLMError("BAD_RESPONSE", _short(str(exc)), _elapsed_ms(start)) from None

    async def check_health(self, timeout_s: float) -> HealthResult:
        """Ask for one token, with a short deadline and no retries: can the endpoint answer at all.

        ``GET /models`` is not enough: a llama.cpp server whose CPU backend
        crashes on the first matrix multiply lists its model happily. One token
        costs a few milliseconds on the embedded model and a fraction of a cent
        elsewhere, and it exercises the very endpoint the prompt style uses.
        """
        start = time.perf_counter()
        client = self.client.with_options(timeout=timeout_s, max_retries=0)
        headers = {PROBE_HEADER: "1"}
        try:
            if self.config.prompt_style == "transcript":
                await client.completions.create(
                    model=self.config.model, prompt="OK", max_tokens=1, temperature=0.0, extra_headers=headers
                )
            else:
                await client.chat.completions.create(
                    model=self.config.model,
                    messages=[{"role": "user", "content": "Say OK."}],
                    max_tokens=1,
                    temperature=0.0,
                    extra_headers=headers,
                )
        except openai.APIStatusError as exc:
            detail = f"completion failed: HTTP {exc.status_code}: {_short(exc.message, 160)}"
            return HealthResult("llm", self.config.base_url, LLM_DOWN, _elapsed_ms(start), detail)
        except openai.APITimeoutError:
            detail = f"no completion within {timeout_s:g}s"
            return HealthResult("llm", self.config.base_url, LLM_DOWN, _elapsed_ms(start), detail)
        except openai.OpenAIError as exc:
            detail = f"cannot reach {self.config.base_url}: {_short(str(exc), 160)}"
            return HealthResult("llm", self.config.base_url, LLM_DOWN, _elapsed_ms(start), detail)
        return HealthResult("llm", self.config.base_url, "SERVING", _elapsed_ms(start))

    async def close(self) -> None:
        """Close the HTTP connection pool."""
        await self.client.close()


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
