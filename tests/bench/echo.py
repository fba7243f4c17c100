"""A bare grpc.aio echo server: the floor a Python gRPC service can reach on this machine.

No interceptors, no protobuf (bytes in, bytes out): the throughput and latency
benchmarks print it next to the real services so their numbers have a reference.
Run as a process: ``python -m tests.bench.echo --address 127.0.0.1:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import grpc

METHOD = "/heist.bench.Echo/Echo"


async def _echo(request: bytes, context: Any) -> bytes:
    return request


async def serve(address: str) -> None:
    """Serve echo until SIGTERM/SIGINT."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.method_handlers_generic_handler(
        "heist.bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(address)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print("READY", flush=True)
    await stop.wait()
    await server.stop(0.2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    asyncio.run(serve(parser.parse_args().address))
