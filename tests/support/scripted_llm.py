"""A scripted OpenAI-compatible endpoint for tests, drills and benchmarks.

A real HTTP server (stdlib, one thread per connection, HTTP/1.1 keep-alive) on
127.0.0.1 and an ephemeral port, so the orchestrator's ``openai`` client, its
timeouts and its retries run exactly as against a real model server.

    with ScriptedLLM() as llm:
        llm.script(text("hello"), tool_call("calculator_evaluate", expression="2+3"), http_error(500), hang(5))
        ... run with config.llm.base_url = llm.base_url ...
        assert llm.chat_requests[0]["messages"][0]["role"] == "system"

Replies are consumed in order; when the script is empty the ``default`` reply
(or ``responder(request_body)``) answers.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "RecordedRequest",
    "Reply",
    "ScriptedLLM",
    "hang",
    "http_error",
    "inline_tool",
    "text",
    "tool_call",
    "tool_calls",
]


@dataclass(frozen=True)
class Reply:
    """One scripted answer to POST /v1/chat/completions."""

    content: str | None = "OK."
    tool_calls: tuple[tuple[str, str], ...] = ()
    status: int = 200
    error_message: str = "scripted failure"
    delay_s: float = 0.0
    finish_reason: str = "stop"
    usage: tuple[int, int] | None = (1, 1)
    """``usage``'s prompt and completion tokens; None: the reply has no ``usage`` (as some servers send)."""


def text(
    content: str, delay_s: float = 0.0, finish_reason: str = "stop", usage: tuple[int, int] | None = (1, 1)
) -> Reply:
    """A plain assistant message (``finish_reason="length"``: it ran out of max_tokens; ``usage``: see ``Reply``)."""
    return Reply(content=content, delay_s=delay_s, finish_reason=finish_reason, usage=usage)


def _usage(reply: Reply) -> dict[str, Any]:
    if reply.usage is None:
        return {}
    prompt, completion = reply.usage
    return {"usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


def inline_tool(tool: str, argument: str, before: str = "Let me check.", after: str = "") -> Reply:
    """A message with one ``[TOOL:tool:argument]`` marker."""
    return Reply(content=f"{before} [TOOL:{tool}:{argument}] {after}".strip())


def tool_call(name: str, arguments: dict[str, Any] | str | None = None, **kwargs: Any) -> Reply:
    """A native tool call: ``tool_call("calculator_evaluate", expression="2+3")``."""
    args = arguments if isinstance(arguments, str) else json.dumps({**(arguments or {}), **kwargs})
    return Reply(content=None, tool_calls=((name, args),))


def tool_calls(*calls: tuple[str, dict[str, Any]]) -> Reply:
    """Several native tool calls in one reply."""
    return Reply(content=None, tool_calls=tuple((name, json.dumps(args)) for name, args in calls))


def http_error(status: int = 500, message: str = "scripted failure") -> Reply:
    """An HTTP error with an OpenAI-style error body."""
    return Reply(content=None, status=status, error_message=message)


def hang(seconds: float = 30.0) -> Reply:
    """No answer for ``seconds`` (released early by ``stop()``): drives client timeouts."""
    return Reply(content="(too late)", delay_s=seconds)


@dataclass
class RecordedRequest:
    """One request the endpoint received."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    received_at: float = field(default_factory=time.monotonic)
    raw: bytes = b""
    """The body exactly as it arrived (``body`` is it parsed)."""
    peer: tuple[str, int] | None = None
    """The client's address and port: requests over one keep-alive connection share it."""

    @property
    def probe(self) -> bool:
        """Whether this is the orchestrator's health probe (``x-heist-probe`` header)."""
        return any(name.lower() == "x-heist-probe" for name in self.headers)


class ScriptedLLM:
    """The endpoint: ``start()``/``stop()`` or a context manager; ``base_url`` ends in ``/v1``."""

    def __init__(
        self,
        default: Reply | None = None,
        *,
        responder: Callable[[dict[str, Any]], Reply] | None = None,
        models: tuple[str, ...] = ("gemma-3-270m",),
    ) -> None:
        self.default = default or text("OK.")
        self.responder = responder
        self.models = models
        self.models_status = 200
        self.probe_status = 200
        """HTTP status of the health probe's one-token completion (500: up, but cannot complete)."""
        self.requests: list[RecordedRequest] = []
        self._script: list[Reply] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._ids = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> ScriptedLLM:
        handler = _handler_for(self)
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self._release.clear()
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop like a process that died: stop listening and drop every open (keep-alive) connection."""
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> ScriptedLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "ScriptedLLM is not started"
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- scripting -----------------------------------------------------------------------------
    def script(self, *replies: Reply) -> ScriptedLLM:
        """Queue replies for the next chat completions, in order."""
        with self._lock:
            self._script.extend(replies)
        return self

    def reset(self) -> None:
        """Forget the script and the recorded requests."""
        with self._lock:
            self._script.clear()
            self.requests.clear()

    @property
    def pending(self) -> int:
        """Scripted replies not consumed yet."""
        with self._lock:
            return len(self._script)

    @property
    def chat_requests(self) -> list[dict[str, Any]]:
        """Bodies of every POST /v1/chat/completions, in arrival order."""
        with self._lock:
            return [r.body or {} for r in self.requests if r.path.endswith("/chat/completions") and not r.probe]

    def _next_reply(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            if self._script:
                return self._script.pop(0)
        return self.responder(body) if self.responder is not None else self.default

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def completion_body(self, reply: Reply, model: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.tool_calls:
            message["tool_calls"] = [
                {"id": f"call_{next(self._ids)}", "type": "function", "function": {"name": name, "arguments": args}}
                for name, args in reply.tool_calls
            ]
        return {
            "id": f"chatcmpl-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {"index": 0, "message": message, "finish_reason": "tool_calls" if reply.tool_calls else "stop"}
            ],
            **_usage(reply),
        }

    def text_completion_body(self, reply: Reply, model: str) -> dict[str, Any]:
        """Build a ``/v1/completions`` reply (prompt_style: transcript): the content as the continuation."""
        return {
            "id": f"cmpl-{next(self._ids)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "text": reply.content, "finish_reason": reply.finish_reason, "logprobs": None}],
            **_usage(reply),
        }

    @property
    def text_requests(self) -> list[dict[str, Any]]:
        """Bodies of the ``/v1/completions`` requests (transcript prompts), in order."""
        with self._lock:
            return [
                r.body
                for r in self.requests
                if r.body is not None and not r.path.endswith("/chat/completions") and not r.probe
            ]

    @property
    def probe_requests(self) -> list[dict[str, Any]]:
        """Bodies of the orchestrator's one-token health probes (answered apart from the script)."""
        with self._lock:
            return [r.body or {} for r in self.requests if r.probe]


def _handler_for(llm: ScriptedLLM) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # Headers and body go out in separate writes; without NODELAY, Nagle adds ~40 ms per reply.
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with llm._lock:
                llm._connections.add(self.request)

        def finish(self) -> None:
            with llm._lock:
                llm._connections.discard(self.request)
            with contextlib.suppress(OSError):
                super().finish()

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def do_GET(self) -> None:
            llm._record(RecordedRequest("GET", self.path, dict(self.headers), None))
            if self.path.rstrip("/").endswith("/models"):
                if llm.models_status != 200:
                    self._send(llm.models_status, {"error": {"message": "models unavailable", "type": "server_error"}})
                    return
                data = [{"id": m, "object": "model", "created": 0, "owned_by": "scripted"} for m in llm.models]
                self._send(200, {"object": "list", "data": data})
                return
            self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                body = {"_raw": raw.decode(errors="replace")}
            peer = (str(self.client_address[0]), int(self.client_address[1]))
            request = RecordedRequest("POST", self.path, dict(self.headers), body, raw=raw, peer=peer)
            llm._record(request)
            route = self.path.rstrip("/")
            if not route.endswith("/completions"):
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            if request.probe:
                # Health probes never consume the script, so tests script turns only.
                reply = text("OK") if llm.probe_status == 200 else http_error(llm.probe_status, "cannot complete")
            else:
                reply = llm._next_reply(body)
            if reply.delay_s > 0 and llm._release.wait(reply.delay_s):
                self.close_connection = True
                return
            if reply.status != 200:
                self._send(reply.status, {"error": {"message": reply.error_message, "type": "server_error"}})
                return
            model = str(body.get("model", "scripted"))
            if route.endswith("/chat/completions"):
                self._send(200, llm.completion_body(reply, model))
            else:
                self._send(200, llm.text_completion_body(reply, model))

    return Handler
