"""The LLM client's plain HTTP/1.1 transport: framing, keep-alive, and httpx2's errors, against a raw test server.

The server here writes exactly the bytes each test scripts (chunked bodies,
gzip, ``Connection: close``, interim responses, dropped connections), which a
real model server only does some of the time.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx2
import pytest

from heist_common.config import LLMConfig
from orchestrator.llm.client import LLMClient
from orchestrator.llm.transport import PlainHTTPTransport
from tests.support.scripted_llm import ScriptedLLM, tool_call

Handler = Callable[[bytes, bytes, asyncio.StreamWriter], Awaitable[bool]]
"""(request head, request body, writer) -> keep the connection open?"""


class RawServer:
    """An asyncio HTTP/1.1 server whose responses are raw bytes written by the test's handler."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                if not await self.handler(head, body, writer):
                    return
        finally:
            writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[tuple[RawServer, httpx2.AsyncClient, PlainHTTPTransport]]:
    raw = RawServer(handler)
    raw.server = await asyncio.start_server(raw._serve, "127.0.0.1", 0)
    transport = PlainHTTPTransport()
    client = httpx2.AsyncClient(transport=transport, timeout=2.0)
    try:
        yield raw, client, transport
    finally:
        await client.aclose()
        raw.server.close()


def reply(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    head = [f"HTTP/1.1 {status}", *headers]
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def echo(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
    """Answer with the request's JSON body wrapped in {"echo": ...}, keep-alive."""
    writer.write(reply(json.dumps({"echo": json.loads(body or b"null")}).encode(), "Content-Type: application/json"))
    await writer.drain()
    return True


async def test_keep_alive_one_connection_one_write_per_request() -> None:
    async with serving(echo) as (server, client, transport):
        for n in range(20):
            response = await client.post(server.url + "/v1/chat/completions?x=1", json={"n": n, "text": "Café ✓"})
            assert response.status_code == 200 and response.json() == {"echo": {"n": n, "text": "Café ✓"}}
        assert transport.connections_opened == 1 and server.connections == 1
        head, body = server.requests[-1]
        lines = head.decode().split("\r\n")
        assert lines[0] == "POST /v1/chat/completions?x=1 HTTP/1.1"
        headers = {
            name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:] if line)
        }
        assert headers["host"] == server.url.removeprefix("http://")
        assert int(headers["content-length"]) == len(body) and json.loads(body)["n"] == 19


async def test_chunked_gzip_body_with_trailer_is_decoded() -> None:
    payload = json.dumps({"choices": [{"text": " ".join(str(n * n) for n in range(3000))}]}).encode()
    packed = gzip.compress(payload)
    third = len(packed) // 3
    chunks = [packed[:third], packed[third : 2 * third], packed[2 * third :]]

    async def handler(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
        framed = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\nX-Trailer: t\r\n\r\n"
        writer.write(reply(framed, "Transfer-Encoding: chunked", "Content-Encoding: gzip"))
        await writer.drain()
        return True

    async with serving(handler) as (server, client, transport):
        for _ in range(2):
            response = await client.get(server.url + "/v1/models")
            assert response.json() == json.loads(payload)
        assert transport.connections_opened == 1  # the chunked body was consumed to its end


async def test_connection_close_and_server_side_closes_open_a_new_connection() -> None:
    async def close_after(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
        announce = b"announce" in head
        writer.write(reply(b"{}", *(["Connection: close"] if announce else [])))
        await writer.drain()
        return False  # the server closes either way; only the first time does it say so

    async with serving(close_after) as (server, client, transport):
        assert (await client.get(server.url + "/", headers={"x-case": "announce"})).status_code == 200
        assert (await client.get(server.url + "/")).status_code == 200
        await asyncio.sleep(0.05)  # the FIN of the unannounced close arrives while the connection is idle
        assert (await client.get(server.url + "/")).status_code == 200
        assert transport.connections_opened == 3 and server.connections == 3


async def test_body_read_to_close_and_interim_response() -> None:
    async def handler(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Type: text/plain\r\n\r\nuntil the end")
        await writer.drain()
        return False

    async with serving(handler) as (server, client, transport):
        response = await client.post(server.url + "/", content=b"x")
        assert (response.status_code, response.reason_phrase, response.text) == (201, "Created", "until the end")
        assert (await client.post(server.url + "/", content=b"y")).text == "until the end"
        assert transport.connections_opened == 2  # a body that ends with the connection ends the connection


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [
        ("silent", httpx2.ReadTimeout),
        ("hang up", httpx2.RemoteProtocolError),
        ("cut short", httpx2.RemoteProtocolError),
        ("garbage", httpx2.RemoteProtocolError),
    ],
)
async def test_failures_are_httpx2_exceptions(behaviour: str, error: type[Exception]) -> None:
    async def handler(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
        if behaviour == "silent":
            await asyncio.sleep(1.0)
        elif behaviour == "cut short":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        elif behaviour == "garbage":
            writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()
        return False

    async with serving(handler) as (server, client, transport):
        with pytest.raises(error):
            await client.post(server.url + "/", content=b"{}", timeout=0.3)
        assert not transport._open  # a failed exchange never goes back to the pool


async def test_connect_refused_is_connect_error() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with httpx2.AsyncClient(transport=PlainHTTPTransport()) as client:
        with pytest.raises(httpx2.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/")


async def test_concurrent_requests_get_their_own_responses() -> None:
    async def slow_echo(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(json.loads(body)["delay"])
        return await echo(head, body, writer)

    async with serving(slow_echo) as (server, client, transport):
        delays = [0.05 * (i % 4) for i in range(16)]
        responses = await asyncio.gather(
            *(client.post(server.url + "/", json={"i": i, "delay": d}) for i, d in enumerate(delays))
        )
        assert [r.json()["echo"]["i"] for r in responses] == list(range(16))
        assert transport.connections_opened == 16  # one per request in flight, all kept for reuse
        await client.post(server.url + "/", json={"i": 99, "delay": 0})
        assert transport.connections_opened == 16


async def test_cancelled_request_does_not_return_its_connection() -> None:
    async def handler(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
        if b"slow" in head:
            await asyncio.sleep(5)
        return await echo(head, body, writer)

    async with serving(handler) as (server, client, transport):
        task = asyncio.ensure_future(client.post(server.url + "/", json=1, headers={"x-case": "slow"}))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await client.post(server.url + "/", json=2)).json() == {"echo": 2}  # not the slow reply
        assert transport.connections_opened == 2


async def test_other_schemes_go_to_the_fallback_transport() -> None:
    seen: list[str] = []

    class Fallback(httpx2.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
            seen.append(str(request.url))
            return httpx2.Response(204)

    async with httpx2.AsyncClient(transport=PlainHTTPTransport(fallback=Fallback)) as client:
        assert (await client.get("https://llm.example.invalid/v1/models")).status_code == 204
    assert seen == ["https://llm.example.invalid/v1/models"]


async def test_llm_client_probe_and_turns_share_one_connection() -> None:
    """The health probe (plain httpx2) and the SDK's requests use one pool: the first turn reuses the probe's socket."""
    with ScriptedLLM() as endpoint:
        endpoint.script(tool_call("calculator_evaluate", expression="1+1"))
        llm = LLMClient(LLMConfig(base_url=endpoint.base_url, prompt_style="chat", max_retries=0))
        try:
            assert (await llm.check_health(2.0)).ok
            first = await llm.complete([{"role": "user", "content": "go"}], [{"type": "function", "function": {}}])
            await llm.complete([{"role": "user", "content": "and?"}])
            await llm.complete_text("planner:")
        finally:
            await llm.close()
    assert first.tool_calls[0].name == "calculator_evaluate"
    assert llm.transport.connections_opened == 1
    assert [r.path for r in endpoint.requests] == ["/v1/chat/completions"] * 3 + ["/v1/completions"]
