"""A lean HTTP/1.1 transport for the LLM client's ``httpx2`` pool: plain ``http://`` over asyncio streams.

Why: against a local model server (llama.cpp, LM Studio, Ollama, vLLM on
127.0.0.1 or the LAN) a turn is a few milliseconds of our own work, and
``httpx2``'s default transport (httpcore's connection pool, h11's state machine,
anyio cancel scopes for every read and write) costs ~0.6 ms of CPU per request
on a 2-core VM, about ten times a plain HTTP/1.1 exchange on an asyncio stream.
This transport does that plain exchange and nothing else; everything above it
(the ``openai`` SDK's retries, timeouts and errors, ``httpx2``'s redirects,
headers, content decoding and proxy routing) is unchanged, because it is
plugged in with ``httpx2.AsyncClient(transport=...)``.

What it does: keep-alive connections pooled per host (an idle connection the
server has closed is never reused), the request's head and body in one write,
``Content-Length``, chunked and read-to-close response bodies, ``Connection:
close``, 1xx responses skipped, the request's connect/read/write timeouts, and
``httpx2``'s exception types (so the SDK maps and retries failures exactly as
before). Responses are read whole before they are returned, which is what the
SDK does for every non-streaming request. ``https://`` (and anything else)
goes to ``httpx2``'s default transport, created only when first needed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx2

__all__ = ["PlainHTTPTransport"]

MAX_HEAD_BYTES = 64 * 1024
"""Longest status line plus headers accepted (a larger head is a protocol error)."""
MAX_CHUNK_LINE_BYTES = 4096


@dataclass(eq=False, slots=True)
class _Connection:
    """One keep-alive TCP connection and the event loop it belongs to."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    loop: asyncio.AbstractEventLoop

    def usable(self) -> bool:
        """Whether an idle connection can carry another request (the server has not closed it)."""
        return (
            not self.reader.at_eof()
            and not self.writer.is_closing()
            and self.reader.exception() is None
            and self.loop is asyncio.get_running_loop()
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class _Body(httpx2.AsyncByteStream):
    """A response body that has already been read off the connection."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._data:
            yield self._data


@dataclass(slots=True)
class _Head:
    status: int
    reason: bytes
    http_version: bytes
    headers: list[tuple[bytes, bytes]]


class PlainHTTPTransport(httpx2.AsyncBaseTransport):
    """HTTP/1.1 keep-alive over asyncio streams for ``http://`` URLs; other schemes go to ``fallback``."""

    def __init__(
        self,
        *,
        max_idle_per_host: int = 100,
        fallback: Callable[[], httpx2.AsyncBaseTransport] = httpx2.AsyncHTTPTransport,
    ) -> None:
        self.max_idle_per_host = max_idle_per_host
        self._make_fallback = fallback
        self._fallback: httpx2.AsyncBaseTransport | None = None
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self.connections_opened = 0
        """How many TCP connections were opened (tests and benchmarks check reuse with it)."""

    def fallback(self) -> httpx2.AsyncBaseTransport:
        """Return the transport for all but plain HTTP, created on first use (its TLS context costs ~50 ms)."""
        if self._fallback is None:
            self._fallback = self._make_fallback()
        return self._fallback

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        """Send ``request`` and return the whole response (``httpx2`` exceptions on failure)."""
        url = request.url
        if url.scheme != "http" or not url.host:
            return await self.fallback().handle_async_request(request)
        timeouts = request.extensions.get("timeout") or {}
        key = (url.host, url.port or 80)
        connection = await self._acquire(key, timeouts.get("connect"), request)
        reusable = False
        try:
            await self._send(connection, request, timeouts.get("write"))
            head, body, reusable = await self._receive(connection, request, timeouts.get("read"))
        finally:
            if reusable:
                self._release(key, connection)
            else:
                self._discard(connection)
        return httpx2.Response(
            head.status,
            headers=head.headers,
            stream=_Body(body),
            request=request,
            extensions={"http_version": head.http_version, "reason_phrase": head.reason},
        )

    async def aclose(self) -> None:
        """Close every connection (idle or not) and the fallback transport."""
        for connection in list(self._open):
            self._discard(connection)
        self._idle.clear()
        if self._fallback is not None:
            await self._fallback.aclose()

    # -- connections ----------------------------------------------------------------------------
    async def _acquire(self, key: tuple[str, int], timeout: float | None, request: httpx2.Request) -> _Connection:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.usable():
                return connection
            self._discard(connection)
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(key[0], key[1], limit=MAX_HEAD_BYTES)
        except TimeoutError:
            raise httpx2.ConnectTimeout(
                f"no connection to {key[0]}:{key[1]} within {timeout}s", request=request
            ) from None
        except OSError as exc:
            raise httpx2.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
        connection = _Connection(reader, writer, asyncio.get_running_loop())
        self._open.add(connection)
        self.connections_opened += 1
        return connection

    def _release(self, key: tuple[str, int], connection: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) < self.max_idle_per_host:
            idle.append(connection)
        else:
            self._discard(connection)

    def _discard(self, connection: _Connection) -> None:
        self._open.discard(connection)
        connection.close()

    # -- one exchange -----------------------------------------------------------------------------
    @staticmethod
    async def _send(connection: _Connection, request: httpx2.Request, timeout: float | None) -> None:
        body = await request.aread()
        lines = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
        chunked = False
        for name, value in request.headers.raw:
            if name.lower() == b"transfer-encoding" and value.lower() == b"chunked":
                chunked = True  # the whole body is at hand: send it as one chunk
            lines += [name, b": ", value, b"\r\n"]
        lines.append(b"\r\n")
        if chunked:
            lines += [b"%x\r\n" % len(body), body, b"\r\n0\r\n\r\n"] if body else [b"0\r\n\r\n"]
        else:
            lines.append(body)
        writer = connection.writer
        try:
            writer.write(b"".join(lines))  # head and body in one write: one wake-up of the server
            if writer.transport.get_write_buffer_size():  # the kernel did not take it all at once
                async with asyncio.timeout(timeout):
                    await writer.drain()
        except TimeoutError:
            raise httpx2.WriteTimeout(f"request not sent within {timeout}s", request=request) from None
        except OSError as exc:
            raise httpx2.WriteError(str(exc) or type(exc).__name__, request=request) from exc

    async def _receive(
        self, connection: _Connection, request: httpx2.Request, timeout: float | None
    ) -> tuple[_Head, bytes, bool]:
        """Read one whole response; (head, body, whether the connection can be reused)."""
        reader = connection.reader
        try:
            async with asyncio.timeout(timeout):
                head = await self._read_head(reader, request)
                while 100 <= head.status < 200 and head.status != 101:  # interim responses (100 Continue)
                    head = await self._read_head(reader, request)
            names = {name.lower(): value for name, value in head.headers}
            connection_header = names.get(b"connection", b"").lower()
            reusable = head.http_version == b"HTTP/1.1" and b"close" not in connection_header
            if request.method == "HEAD" or head.status in (204, 304) or head.status == 101:
                return head, b"", reusable and head.status != 101
            async with asyncio.timeout(timeout):
                if b"chunked" in names.get(b"transfer-encoding", b"").lower():
                    body = await self._read_chunked(reader, request)
                elif b"content-length" in names:
                    length = _content_length(names[b"content-length"], request)
                    body = await reader.readexactly(length)
                else:  # the body ends where the connection does
                    body = await reader.read()
                    reusable = False
        except TimeoutError:
            raise httpx2.ReadTimeout(f"no complete response within {timeout}s", request=request) from None
        except asyncio.IncompleteReadError as exc:
            message = "Server disconnected without sending a response." if not exc.partial else "Response cut short."
            raise httpx2.RemoteProtocolError(message, request=request) from None
        except asyncio.LimitOverrunError:
            raise httpx2.RemoteProtocolError("response head or chunk line too long", request=request) from None
        except OSError as exc:
            raise httpx2.ReadError(str(exc) or type(exc).__name__, request=request) from exc
        return head, body, reusable

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader, request: httpx2.Request) -> _Head:
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw[:-4].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise httpx2.RemoteProtocolError(f"bad status line {lines[0][:100]!r}", request=request)
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
                raise httpx2.RemoteProtocolError(f"bad header line {line[:100]!r}", request=request)
            headers.append((name, value.strip()))
        return _Head(int(parts[1]), parts[2] if len(parts) > 2 else b"", parts[0], headers)

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader, request: httpx2.Request) -> bytes:
        chunks: list[bytes] = []
        while True:
            line = await reader.readuntil(b"\r\n")
            if len(line) > MAX_CHUNK_LINE_BYTES:
                raise httpx2.RemoteProtocolError("chunk size line too long", request=request)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise httpx2.RemoteProtocolError(f"bad chunk size {line[:40]!r}", request=request) from None
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, up to the empty line
                    pass
                return b"".join(chunks)
            chunks.append(await reader.readexactly(size))
            if await reader.readexactly(2) != b"\r\n":
                raise httpx2.RemoteProtocolError("chunk not followed by CRLF", request=request)


def _content_length(value: bytes, request: httpx2.Request) -> int:
    try:
        length = int(value)
    except ValueError:
        length = -1
    if length < 0:
        raise httpx2.RemoteProtocolError(f"bad Content-Length {value[:40]!r}", request=request)
    return length
