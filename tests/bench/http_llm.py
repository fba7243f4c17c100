"""A fast scripted OpenAI-compatible HTTP endpoint for the benchmarks, as its own process.

Why not ``tests.support.scripted_llm``: that one is a stdlib thread-per-connection
server in the test's own process, fine for correctness but costly enough per
request to blur a ~4 ms turn, and it shares the orchestrator's GIL. This one is
an asyncio protocol (HTTP/1.1, keep-alive, TCP_NODELAY) in a separate process
on 127.0.0.1, speaking just enough of the OpenAI API for the benchmark's
turns. What it costs per request is measured (``GET /bench/stats``) and is part
of the floor the turns are compared with.

    python -m tests.bench.http_llm [--delay-ms 200] [--record]   # prints "READY <port>"

Replies, decided from the request only (so any number of sessions can share it):

- ``POST /v1/completions`` (``prompt_style: transcript``): a prompt ending in an
  open ``[TOOL:<tool>:`` prefill gets that tool's argument and ``]`` back, so the
  turn makes one real tool call; any other prompt gets a plain line.
- ``POST /v1/chat/completions`` (``tool_calling: native``): a request offering
  ``tools`` whose last message is not a tool result gets a ``tool_calls`` reply
  for the first offered function; after the tool result, a plain answer.
- Health probes (``x-heist-probe`` header) are answered at once, never delayed.

``--delay-ms`` simulates model latency (every non-probe completion); ``--record``
keeps the raw request bodies (``GET /bench/recorded``) so the floor can replay
the very bytes the orchestrator sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

from tests.support.processes import REPO, stop_process

ARGUMENTS: dict[str, str] = {
    "calculator": "(120-15)*3",
    "file_reader": "vault_time_lock.md",
    "database_query": "SELECT COUNT(*) FROM guards",
}
"""What each tool is asked (the inline marker's argument)."""

FUNCTION_ARGUMENTS: dict[str, dict[str, str]] = {
    "calculator_evaluate": {"expression": ARGUMENTS["calculator"]},
    "file_reader_read_file": {"filename": ARGUMENTS["file_reader"]},
    "database_query_query": {"sql": ARGUMENTS["database_query"]},
}
"""The same requests as native function calls."""

MAX_RECORDED = 50_000
"""Recording is bounded, so a long run cannot eat the machine's memory."""


class Endpoint:
    """State shared by every connection: counters, the recorded bodies, the simulated latency."""

    def __init__(self, delay_s: float, record: bool) -> None:
        self.delay_s = delay_s
        self.record = record
        self.recorded: list[tuple[str, str]] = []
        self.requests = 0
        """OpenAI API requests served (health probes included, the ``/bench/`` routes not)."""
        self.completions = 0
        self.first_completion_at: float | None = None
        """``time.monotonic()`` of the first non-probe completion (CLOCK_MONOTONIC: comparable across processes)."""
        self.busy_s = 0.0
        """Time spent handling completions (parse, decide, serialize), the endpoint's own cost."""
        self._ids = 0

    def reset(self) -> None:
        self.recorded.clear()
        self.requests = self.completions = 0
        self.first_completion_at = None
        self.busy_s = 0.0

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "completions": self.completions,
            "first_completion_at": self.first_completion_at,
            "busy_us_per_completion": round(1e6 * self.busy_s / self.completions, 1) if self.completions else None,
        }

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def handle(self, method: str, path: str, probe: bool, body: bytes) -> tuple[int, bytes, bool]:
        """Return (status, JSON reply, delay it?) for one request."""
        route = path.split("?", 1)[0].rstrip("/")
        if not route.startswith("/bench/"):
            self.requests += 1
        if method == "GET" and route.endswith("/models"):
            return (
                200,
                b'{"object":"list","data":[{"id":"bench","object":"model","created":0,"owned_by":"bench"}]}',
                False,
            )
        if method == "GET" and route == "/bench/stats":
            return 200, json.dumps(self.stats()).encode(), False
        if method == "GET" and route == "/bench/recorded":
            data = [{"path": p, "body": b} for p, b in self.recorded]
            return 200, json.dumps({"requests": data}).encode(), False
        if method == "POST" and route == "/bench/reset":
            self.reset()
            return 200, b"{}", False
        if method != "POST" or not route.endswith("/completions"):
            return 404, b'{"error":{"message":"no such route","type":"invalid_request_error"}}', False
        started = time.perf_counter()
        try:
            request = json.loads(body)
        except ValueError:
            return 400, b'{"error":{"message":"body is not JSON","type":"invalid_request_error"}}', False
        if not probe:
            self.completions += 1
            if self.first_completion_at is None:
                self.first_completion_at = time.monotonic()
            if self.record and len(self.recorded) < MAX_RECORDED:
                self.recorded.append((route, body.decode()))
        model = str(request.get("model", "bench"))
        if route.endswith("/chat/completions"):
            reply = self._chat(request, model, probe)
        else:
            reply = self._text(request, model, probe)
        data = json.dumps(reply, separators=(",", ":")).encode()
        if not probe:
            self.busy_s += time.perf_counter() - started
        return 200, data, not probe

    def _text(self, request: dict[str, Any], model: str, probe: bool) -> dict[str, Any]:
        prompt = str(request.get("prompt", ""))
        opening = prompt.rfind("[TOOL:")
        if probe:
            text = "OK"
        elif opening >= 0 and "]" not in prompt[opening:]:
            tool = prompt[opening + len("[TOOL:") :].split(":", 1)[0]
            text = f"{ARGUMENTS.get(tool, '1+1')}] done."
        else:
            text = f"Noted, step {self.completions}."
        return {
            "id": f"cmpl-{self._next_id()}", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }  # fmt: skip

    def _chat(self, request: dict[str, Any], model: str, probe: bool) -> dict[str, Any]:
        messages = request.get("messages") or [{}]
        tools = request.get("tools") or []
        message: dict[str, Any] = {"role": "assistant", "content": "OK"}
        finish = "stop"
        if not probe and tools and messages[-1].get("role") != "tool" and request.get("tool_choice") != "none":
            name = str(tools[0].get("function", {}).get("name", ""))
            arguments = json.dumps(FUNCTION_ARGUMENTS.get(name, {}))
            call = {
                "id": f"call_{self._next_id()}",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            finish = "tool_calls"
        elif not probe:
            message["content"] = f"Done, step {self.completions}."
        return {
            "id": f"chatcmpl-{self._next_id()}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }  # fmt: skip


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: requests are parsed as bytes arrive, answered in order."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.pending = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end].decode("latin-1").split("\r\n")
            length = 0
            probe = False
            for line in head[1:]:
                name, _, value = line.partition(":")
                lowered = name.strip().lower()
                if lowered == "content-length":
                    length = int(value.strip())
                elif lowered == "x-heist-probe":
                    probe = True
            if len(self.buffer) < head_end + 4 + length:
                return
            body = self.buffer[head_end + 4 : head_end + 4 + length]
            self.buffer = self.buffer[head_end + 4 + length :]
            method, path, _ = head[0].split(" ", 2)
            status, reply, delayed = self.endpoint.handle(method, path, probe, body)
            response = (
                f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(reply)}\r\n\r\n"
            ).encode() + reply
            if delayed and self.endpoint.delay_s > 0:
                asyncio.get_running_loop().call_later(self.endpoint.delay_s, self._write, response)
            else:
                self._write(response)

    def _write(self, response: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(response)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(port: int, delay_s: float, record: bool) -> None:
    """Serve until SIGTERM/SIGINT; print ``READY <port>`` once listening."""
    endpoint = Endpoint(delay_s, record)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(endpoint), "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()


class HttpLLM:
    """The endpoint as a child process: ``start()``, ``base_url``, its counters, ``stop()`` (idempotent)."""

    def __init__(self, delay_ms: float = 0.0, *, record: bool = False) -> None:
        self.delay_ms = delay_ms
        self.record = record
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> HttpLLM:
        command = [sys.executable, "-m", "tests.bench.http_llm", "--delay-ms", str(self.delay_ms)]
        self.process = subprocess.Popen(
            [*command, *(["--record"] if self.record else [])],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode().split()
        if len(line) != 2 or line[0] != "READY":
            self.stop()
            raise RuntimeError("the benchmark LLM endpoint did not start")
        self.port = int(line[1])
        return self

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL."""
        return f"http://127.0.0.1:{self.port}/v1"

    def _call(self, method: str, route: str) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{route}", method=method, data=b"" if method == "POST" else None
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            return json.loads(reply.read())

    def stats(self) -> dict[str, Any]:
        """Requests and completions served, when the first completion came, its cost per completion."""
        result: dict[str, Any] = self._call("GET", "/bench/stats")
        return result

    def recorded(self) -> list[tuple[str, bytes]]:
        """(route, raw body) of every completion since the last reset (``record=True`` only)."""
        return [(r["path"], r["body"].encode()) for r in self._call("GET", "/bench/recorded")["requests"]]

    def reset(self) -> None:
        """Forget counters and recorded bodies."""
        self._call("POST", "/bench/reset")

    def stop(self) -> None:
        """Terminate the process (killed if it does not go); idempotent."""
        stop_process(self.process, grace_s=5)

    def __enter__(self) -> HttpLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.http_llm", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="simulated model latency per completion")
    parser.add_argument("--record", action="store_true", help="keep the raw request bodies (GET /bench/recorded)")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.delay_ms / 1000.0, args.record))


if __name__ == "__main__":
    main()
