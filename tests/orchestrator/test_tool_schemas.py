from __future__ import annotations

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from heist.calculator.v1 import calculator_pb2

from heist_common.contract import contract_of, required_scope
from heist_common.tools.registry import ToolArgumentError, ToolRegistry, message_schema
from tests.support.config import TOOLS

REGISTRY = ToolRegistry.for_services(TOOLS)


def test_schema_derived_from_request_descriptor_with_argument_description() -> None:
    method = REGISTRY.method_by_function("calculator_evaluate")
    assert method is not None
    assert method.parameters == {
        "type": "object",
        "properties": {
            "expression": {"type": "string", "description": "Arithmetic expression, e.g. (120 - 15) * 3 / 7"}
        },
        "required": ["expression"],
        "additionalProperties": False,
    }
    assert method.description.startswith("Evaluate an arithmetic expression")
    assert method.inline_default
    assert method.required_scope == "calculator:use"


def test_every_tool_method_offered_with_scope_from_proto() -> None:
    names = {m.function_name for s in REGISTRY.services.values() for m in s.methods}
    expected = {
        f"{tool}_{method.name[0].lower()}{''.join('_' + c.lower() if c.isupper() else c for c in method.name[1:])}"
        for tool in TOOLS
        for method in contract_of(tool).tool_methods
    }
    assert names == expected and len(names) >= len(TOOLS)
    for service in REGISTRY.services.values():
        for method in service.methods:
            assert method.required_scope == required_scope(method.method) is not None
    assert REGISTRY.scopes_for(("file_reader", "database_query")) == ("database_query:use", "file_reader:use")
    assert REGISTRY.service("file_reader").inline_method.function_name == "file_reader_read_file"  # type: ignore[union-attr]


def test_openai_tool_shape() -> None:
    tools = REGISTRY.functions_for(("file_reader",))
    assert [t["function"]["name"] for t in tools] == ["file_reader_read_file", "file_reader_list_files"]
    assert all(t["type"] == "function" and t["function"]["parameters"]["type"] == "object" for t in tools)


def test_arguments_parsed_back_with_json_format() -> None:
    method = REGISTRY.method_by_function("calculator_evaluate")
    assert method is not None
    request = method.parse_arguments('{"expression": "2+3"}')
    assert isinstance(request, calculator_pb2.EvaluateRequest)
    assert request.expression == "2+3"
    with pytest.raises(ToolArgumentError, match="calculator_evaluate"):
        method.parse_arguments('{"expr": "2+3"}')
    with pytest.raises(ToolArgumentError):
        method.parse_arguments("not json")
    assert method.inline_request("7*6").expression == "7*6"  # type: ignore[attr-defined]


def test_schema_walk_covers_repeated_enum_nested_and_optional_fields() -> None:
    pool = descriptor_pool.DescriptorPool()
    file = descriptor_pb2.FileDescriptorProto(name="t.proto", package="t", syntax="proto3")
    enum = file.enum_type.add(name="Mode")
    enum.value.add(name="MODE_UNSPECIFIED", number=0)
    enum.value.add(name="MODE_FAST", number=1)
    inner = file.message_type.add(name="Inner")
    inner.field.add(
        name="count",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    outer = file.message_type.add(name="Outer")
    fdp = descriptor_pb2.FieldDescriptorProto
    outer.field.add(name="tags", number=1, type=fdp.TYPE_STRING, label=fdp.LABEL_REPEATED)
    outer.field.add(name="mode", number=2, type=fdp.TYPE_ENUM, type_name=".t.Mode", label=fdp.LABEL_OPTIONAL)
    outer.field.add(name="inner", number=3, type=fdp.TYPE_MESSAGE, type_name=".t.Inner", label=fdp.LABEL_OPTIONAL)
    outer.field.add(
        name="ratio", number=4, type=fdp.TYPE_DOUBLE, label=fdp.LABEL_OPTIONAL, proto3_optional=True, oneof_index=0
    )
    outer.oneof_decl.add(name="_ratio")
    pool.Add(file)
    descriptor = pool.FindMessageTypeByName("t.Outer")
    schema = message_schema(descriptor)
    props = schema["properties"]
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert props["mode"] == {"type": "string", "enum": ["MODE_UNSPECIFIED", "MODE_FAST"]}
    assert props["inner"]["properties"]["count"] == {"type": "integer"}
    assert props["ratio"] == {"type": "number"}
    assert schema["required"] == ["mode"]  # repeated, message and explicit-presence fields are optional
    message_factory.GetMessageClass(descriptor)  # the descriptor is a valid message
