"""Registration that answers a request the server cannot parse with INVALID_ARGUMENT instead of UNKNOWN.

Why: grpc runs the request deserializer before any handler, and when protobuf
refuses the bytes (corrupt wire format, a string field that is not UTF-8) the
caller gets UNKNOWN with a Python exception name in it. Here the deserializer
never raises: it hands the handler a ``MalformedRequest`` and the handler
aborts with INVALID_ARGUMENT saying what was wrong. Authentication still runs
first (the middleware wraps these handlers like any other). The lifecycle
registers every service with only unary methods this way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

MAX_DETAIL_CHARS = 200


class MalformedRequest:
    """Stands in for a request whose bytes protobuf refused; carries protobuf's reason."""

    def __init__(self, type_name: str, reason: str) -> None:
        self.type_name = type_name
        self.reason = reason[:MAX_DETAIL_CHARS]


def tolerant_deserializer(message_type: type[Message]) -> Callable[[bytes], Message | MalformedRequest]:
    """``message_type.FromString`` that returns a MalformedRequest instead of raising."""
    type_name = message_type.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Message | MalformedRequest:
        try:
            return message_type.FromString(data)
        except (DecodeError, ValueError, RuntimeError) as exc:
            return MalformedRequest(type_name, str(exc) or type(exc).__name__)

    return deserialize


def refusing_malformed(
    behavior: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]],
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    """Wrap a unary handler so a MalformedRequest is answered with INVALID_ARGUMENT."""

    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, MalformedRequest):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {request.type_name}: {request.reason}"
            )
        return await behavior(request, context)

    return handle


def guarded_registration(descriptor: ServiceDescriptor) -> Callable[[Any, Any], None]:
    """Build a ``register(servicer, server)`` for the unary methods of ``descriptor``: the generated one, tolerant."""
    for method in descriptor.methods:
        if method.client_streaming or method.server_streaming:
            raise ValueError(f"{method.full_name}: only unary methods can be registered with guarded_registration")

    def register(servicer: Any, server: Any) -> None:
        handlers = {
            method.name: grpc.unary_unary_rpc_method_handler(
                refusing_malformed(getattr(servicer, method.name)),
                request_deserializer=tolerant_deserializer(message_factory.GetMessageClass(method.input_type)),
                response_serializer=message_factory.GetMessageClass(method.output_type).SerializeToString,
            )
            for method in descriptor.methods
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
        server.add_registered_method_handlers(descriptor.full_name, handlers)

    return register
