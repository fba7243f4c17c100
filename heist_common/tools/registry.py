"""Tool registry: every tool method's LLM function schema is derived from its proto.

The ``.proto`` is the single source of truth: descriptions and argument
descriptions are method/field options, the required OAuth scope is the
``required_scope`` method option, and the JSON schema is a walk over the request
message descriptor. Adding a tool method to a proto makes it callable by the
model without touching Python.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from heist.tools.v1 import options_pb2 as tool_options

from heist_common.contract import (
    ServiceContract,
    approval_required,
    contract_of,
    is_idempotent,
    is_inline_default,
    required_scope,
    tool_description,
)

JsonSchema = dict[str, Any]

_INTEGER_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
_WELL_KNOWN_SCHEMAS: dict[str, JsonSchema] = {
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array"},
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "description": "Seconds with an 's' suffix, e.g. 1.5s"},
    "google.protobuf.StringValue": {"type": "string"},
    "google.protobuf.BoolValue": {"type": "boolean"},
    "google.protobuf.DoubleValue": {"type": "number"},
    "google.protobuf.Int64Value": {"type": "integer"},
    "google.protobuf.Int32Value": {"type": "integer"},
}
_MAX_DEPTH = 6
_64_BIT_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


class ToolArgumentError(ValueError):
    """The model's arguments do not fit the tool's request message."""


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _field_schema(fd: FieldDescriptor, depth: int, output: bool) -> JsonSchema:
    """Describe one field's value(s); maps and repeated fields wrap the element schema."""
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        value_field = fd.message_type.fields_by_name["value"]
        return {"type": "object", "additionalProperties": _value_schema(value_field, depth, output)}
    element = _value_schema(fd, depth, output)
    return {"type": "array", "items": element} if fd.is_repeated else element


def _value_schema(fd: FieldDescriptor, depth: int, output: bool) -> JsonSchema:
    if fd.message_type is not None:
        return message_schema(fd.message_type, depth + 1, output=output)
    if output and fd.enum_type is not None and fd.enum_type.full_name == "google.protobuf.NullValue":
        return {"type": "null"}  # proto3 JSON writes NullValue as null
    if output and fd.type in _64_BIT_TYPES:
        return {"type": "string", "pattern": "^-?[0-9]+$"}  # proto3 JSON writes 64-bit integers as strings
    if fd.enum_type is not None:
        return {"type": "string", "enum": [value.name for value in fd.enum_type.values]}
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return {"type": "boolean"}
    if fd.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return {"type": "number"}
    if fd.type in _INTEGER_TYPES:
        return {"type": "integer"}
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return {"type": "string", "contentEncoding": "base64"}
    return {"type": "string"}


def _is_required(fd: FieldDescriptor) -> bool:
    """Proto3 has no 'required'; a plain singular scalar is what the method cannot do without.

    Fields with explicit presence (``optional``, oneof members, messages) and
    repeated fields may be omitted by the model.
    """
    return not fd.is_repeated and not fd.has_presence and fd.type != FieldDescriptor.TYPE_MESSAGE


def message_schema(descriptor: Descriptor, depth: int = 0, *, output: bool = False) -> JsonSchema:
    """JSON schema (OpenAI function-parameters dialect) of a request message.

    ``output``: the schema of a response as ``response_data`` writes it (proto3 JSON: 64-bit integers
    as strings, NullValue as null, every field present), for MCP's ``outputSchema``.
    """
    if descriptor.full_name in _WELL_KNOWN_SCHEMAS:
        return dict(_WELL_KNOWN_SCHEMAS[descriptor.full_name])
    if depth > _MAX_DEPTH:  # recursive messages: stop describing, still accept an object
        return {"type": "object"}
    properties: dict[str, JsonSchema] = {}
    required: list[str] = []
    for fd in descriptor.fields:
        schema = _field_schema(fd, depth, output)
        description: str = fd.GetOptions().Extensions[tool_options.argument_description]
        if description:
            schema["description"] = description
        properties[fd.name] = schema
        if _is_required(fd) or (output and fd.is_repeated):
            required.append(fd.name)
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def response_data(response: Message) -> dict[str, Any]:
    """Return a response as proto3 JSON: the proto's field names, every field present (what ``output`` describes)."""
    data: dict[str, Any] = json_format.MessageToDict(
        response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return data


@dataclass(frozen=True)
class ToolMethod:
    """One RPC the model may call, with everything needed to call it and to describe it."""

    tool: str
    function_name: str
    method: MethodDescriptor
    request_class: type[Message]
    description: str
    required_scope: str | None
    inline_default: bool
    parameters: JsonSchema
    result_schema: JsonSchema
    """The response message's schema, as ``response_data`` writes it (MCP's ``outputSchema``)."""
    approval_required: bool = False
    """The contract's ``approval`` option: every call waits for a person (agents' ``require_approval`` adds more)."""
    idempotent: bool = False
    """The contract's ``idempotency_level``: a resume may send a call again whose result was lost."""

    @property
    def rpc_path(self) -> str:
        """GRPC's ``/package.Service/Method`` path (what the servers log and authorize)."""
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    def openai_tool(self) -> dict[str, Any]:
        """Build the ``tools=[...]`` entry for chat.completions."""
        return {
            "type": "function",
            "function": {"name": self.function_name, "description": self.description, "parameters": self.parameters},
        }

    def parse_arguments(self, arguments: str | Mapping[str, Any]) -> Message:
        """Turn the model's JSON arguments into the typed request; ToolArgumentError if they don't fit."""
        try:
            data = json.loads(arguments or "{}") if isinstance(arguments, str) else dict(arguments)
            if not isinstance(data, dict):
                raise ToolArgumentError(f"arguments must be a JSON object, got {type(data).__name__}")
            return json_format.ParseDict(data, self.request_class())
        except (ValueError, json_format.ParseError) as exc:
            if isinstance(exc, ToolArgumentError):
                raise
            raise ToolArgumentError(f"invalid arguments for {self.function_name}: {exc}") from None

    def _inline_field(self) -> tuple[str, str] | None:
        """Return (name, argument description) of the single string field the inline convention fills.

        None unless the request has exactly one string field.
        """
        string_fields = [fd for fd in self.request_class.DESCRIPTOR.fields if fd.type == FieldDescriptor.TYPE_STRING]
        if len(string_fields) != 1:
            return None
        description: str = string_fields[0].GetOptions().Extensions[tool_options.argument_description]
        return string_fields[0].name, description

    @property
    def inline_example(self) -> str:
        """An example argument for the inline convention, from the field's ``e.g.`` in the proto ('' if none)."""
        field = self._inline_field()
        description = field[1] if field is not None else ""
        return description.split("e.g. ", 1)[1].strip() if "e.g. " in description else ""

    def inline_request(self, argument: str) -> Message:
        """Request for the inline convention: the argument fills the single string field."""
        field = self._inline_field()
        if field is None:
            raise ToolArgumentError(f"{self.function_name} cannot be called inline (needs exactly one string field)")
        request = self.request_class()
        setattr(request, field[0], argument)
        return request


@dataclass(frozen=True)
class ToolService:
    """A tool (one gRPC service) and its callable methods."""

    name: str
    descriptor: ServiceDescriptor
    stub_class: Callable[[grpc.aio.Channel], Any]
    methods: tuple[ToolMethod, ...]
    inline_method: ToolMethod | None

    @property
    def required_scopes(self) -> tuple[str, ...]:
        """Every scope a token needs to call all of this tool's methods."""
        return tuple(sorted({m.required_scope for m in self.methods if m.required_scope}))


def _build_service(contract: ServiceContract) -> ToolService:
    name, descriptor = contract.name, contract.descriptor
    methods = tuple(
        ToolMethod(
            tool=name,
            function_name=f"{name}_{_snake(method.name)}",
            method=method,
            request_class=message_factory.GetMessageClass(method.input_type),
            description=tool_description(method),
            required_scope=required_scope(method),
            inline_default=is_inline_default(method),
            parameters=message_schema(method.input_type),
            approval_required=approval_required(method),
            idempotent=is_idempotent(method),
            result_schema=message_schema(method.output_type, output=True),
        )
        for method in contract.tool_methods  # only methods the proto offers to models
    )
    inline = next((m for m in methods if m.inline_default), None)
    return ToolService(
        name=name,
        descriptor=descriptor,
        stub_class=contract.stub_class,
        methods=methods,
        inline_method=inline,
    )


@dataclass(frozen=True)
class ToolRegistry:
    """All tool services, looked up by tool name or by OpenAI function name."""

    services: dict[str, ToolService] = field(default_factory=dict)

    @classmethod
    def for_services(cls, names: Iterable[str]) -> ToolRegistry:
        """Registry of the tool services among ``names`` (services whose contract offers methods to models)."""
        contracts = (contract_of(name) for name in names)
        return cls({contract.name: _build_service(contract) for contract in contracts if contract.is_tool})

    def service(self, tool: str) -> ToolService:
        """Return the tool service called ``tool``; KeyError for unknown tools."""
        return self.services[tool]

    def method_by_function(self, function_name: str) -> ToolMethod | None:
        """Return the method behind an OpenAI function name, or None if no tool has it."""
        for service in self.services.values():
            for method in service.methods:
                if method.function_name == function_name:
                    return method
        return None

    def functions_for(self, tools: tuple[str, ...]) -> list[dict[str, Any]]:
        """``tools=[...]`` for an agent allowed to use ``tools``."""
        return [method.openai_tool() for tool in tools for method in self.services[tool].methods]

    def scopes_for(self, tools: tuple[str, ...]) -> tuple[str, ...]:
        """Scopes an agent's token must carry to use ``tools`` (from the proto options)."""
        return tuple(sorted({scope for tool in tools for scope in self.services[tool].required_scopes}))


def render_result(response: Message, max_chars: int, *, plain: bool = False) -> str:
    """Render a tool response for the model, bounded so one document cannot flood the context.

    JSON for function calling (the model gets structured data back); ``plain``
    text for inline markers, whose results become part of a spoken line.
    """
    data = json_format.MessageToDict(response, preserving_proto_field_name=True)
    text = _plain(data) if plain else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def _plain(value: Any) -> str:
    """Readable text of JSON-shaped data: ``key: value; ...``, rows by `` | ``, one-key wrappers unwrapped."""
    value = _unwrap(value)
    if isinstance(value, dict):
        return "; ".join(f"{key}: {_plain(item)}" for key, item in value.items())
    if isinstance(value, list):
        compound = any(isinstance(_unwrap(item), dict | list) for item in value)
        return (" | " if compound else ", ").join(_plain(item) for item in value)
    return " ".join(str(value).split())


def _unwrap(value: Any) -> Any:
    """Strip one-key dicts: oneof wrappers (``{"text_value": "x"}``) and single-field messages (``{"values": []}``)."""
    while isinstance(value, dict) and len(value) == 1:
        value = next(iter(value.values()))
    return value
