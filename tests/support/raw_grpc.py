"""A hostile gRPC client: raw HTTP/2 (the ``h2`` library) that sends what well-behaved clients refuse to.

The ``grpcio`` client refuses metadata with newlines or control characters, and
never leaves a connection half-open on purpose; an attacker's client does both.
Over mTLS (``tls``: an ``ssl`` context with a client certificate, from
``heist_common.tls.ssl_client_context``) it is an insider with a valid
certificate, which is exactly who the server's own checks must still stop.
"""

from __future__ import annotations

import socket
import ssl
import struct

import h2.config
import h2.connection
import h2.events
from google.protobuf.message import Message

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""The HTTP/2 client connection preface (without the SETTINGS frame that normally follows)."""


def call(
    address: str,
    path: str,
    request: Message,
    metadata: list[tuple[bytes, bytes]],
    timeout_s: float = 5.0,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> tuple[str, str]:
    """Send one unary call with raw metadata bytes; return (grpc-status, grpc-message) as the server sent them.

    ``server_name``: the name the server's certificate must carry (``heist_common.tls.server_name``).
    """
    host, _, port = address.rpartition(":")
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    raw = socket.create_connection((host, int(port)), timeout=timeout_s)
    sock = tls.wrap_socket(raw, server_hostname=server_name or host) if tls is not None else raw
    with sock:
        connection.initiate_connection()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"https" if tls is not None else b"http"),
            (b":path", path.encode()),
            (b":authority", address.encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *metadata,
        ]
        stream = connection.get_next_available_stream_id()
        connection.send_headers(stream, headers)
        body = request.SerializeToString()
        connection.send_data(stream, struct.pack(">?I", False, len(body)) + body, end_stream=True)
        sock.sendall(connection.data_to_send())
        status, message = "", ""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    fields = {bytes(k): bytes(v) for k, v in event.headers}
                    status = fields.get(b"grpc-status", status.encode()).decode()
                    message = fields.get(b"grpc-message", message.encode()).decode()
                if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    return status, message
            sock.sendall(connection.data_to_send())
    return status, message
