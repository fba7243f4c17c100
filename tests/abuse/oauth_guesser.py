"""A secret guesser as a process of its own: wrong secrets for some OAuth clients, every ``--every-s``, until stopped.

Run by ``tests/abuse/test_oauth_lockout.py`` beside a heist, as another user of
the machine would run it: ``python -m tests.abuse.oauth_guesser --config ...``.
Each round opens a fresh connection (a new source port), so the server cannot
tell the rounds apart by connection. ``--identity`` picks the client
certificate under mTLS; ``--source-host`` (e.g. ``127.0.0.2``) makes the
connections come from another loopback address, through a small TCP relay in
this process, so under plaintext the guesser is another host. After every
round the status codes seen so far, per client, are written to ``--report``
(JSON, replaced atomically), which the test reads while the guesser runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
from heist.oauth.v1 import oauth_pb2, oauth_pb2_grpc

from heist_common import tls
from heist_common.config import load_config, split_address


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    for end in (source, sink):
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)


def relay(target: str, source_host: str) -> str:
    """Listen on 127.0.0.1; forward every connection to ``target`` from ``source_host``. Return where it listens."""
    host, port = split_address(target)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            inbound, _ = listener.accept()
            outbound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            outbound.bind((source_host, 0))
            outbound.connect((host, port))
            for a, b in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{listener.getsockname()[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--clients", required=True, help="comma-separated client ids to guess for")
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--every-s", type=float, default=0.1)
    parser.add_argument("--identity", default="grpcurl", help="client certificate under mTLS")
    parser.add_argument("--source-host", default=None, help="connect from this local address (via a relay)")
    args = parser.parse_args()

    config = load_config(args.config)
    target = config.service("oauth").address
    if args.source_host:
        target = relay(target, args.source_host)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    seen: dict[str, Counter[str]] = {client: Counter() for client in args.clients.split(",")}
    while not stopping.is_set():
        started = time.monotonic()
        with tls.sync_channel(config, target, service="oauth", identity=args.identity) as channel:
            stub = oauth_pb2_grpc.OAuthServiceStub(channel)
            for client in seen:
                guess = oauth_pb2.IssueTokenRequest(
                    grant_type="client_credentials", client_id=client, client_secret=secrets.token_urlsafe(16)
                )
                try:
                    stub.IssueToken(guess, timeout=2.0)
                    seen[client]["OK"] += 1
                except grpc.RpcError as exc:
                    seen[client][exc.code().name] += 1
        partial = args.report.with_name(args.report.name + ".tmp")
        partial.write_text(json.dumps({client: dict(codes) for client, codes in seen.items()}))
        os.replace(partial, args.report)
        stopping.wait(max(0.0, args.every_s - (time.monotonic() - started)))


if __name__ == "__main__":
    main()
