"""The contract's say on tool calls: which wait for approval (``heist.tools.v1.approval``) and which may be repeated."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from heist.tools.v1 import options_pb2 as tool_options

from heist_common.config import AgentConfig
from heist_common.contract import approval_required, contract_of, is_idempotent
from heist_common.tools.registry import ToolRegistry


def test_the_shipped_read_only_methods_are_idempotent_and_a_query_is_not() -> None:
    registry = ToolRegistry.for_services(["calculator", "file_reader", "database_query"])
    idempotent = {(m.tool, m.method.name): m.idempotent for s in registry.services.values() for m in s.methods}
    assert idempotent == {
        ("calculator", "Evaluate"): True,
        ("file_reader", "ReadFile"): True,
        ("file_reader", "ListFiles"): True,
        ("database_query", "Query"): False,
        ("database_query", "ListTables"): True,
    }
    assert not any(m.approval_required for s in registry.services.values() for m in s.methods)


def test_a_method_declaring_approval_required_is_read_as_such() -> None:
    """A contract of a tool with effects (built here: no shipped method has effects)."""
    file = descriptor_pb2.FileDescriptorProto(
        name="tests/heist/vault/v1/vault.proto", package="tests.heist.vault.v1", syntax="proto3",
        dependency=["heist/tools/v1/options.proto"],
    )  # fmt: skip
    file.message_type.add(name="OpenRequest")
    file.message_type.add(name="OpenResponse")
    service = file.service.add(name="VaultService")
    opened = service.method.add(name="Open", input_type=".tests.heist.vault.v1.OpenRequest",
                                 output_type=".tests.heist.vault.v1.OpenResponse")  # fmt: skip
    opened.options.Extensions[tool_options.approval] = tool_options.APPROVAL_REQUIRED
    opened.options.idempotency_level = descriptor_pb2.MethodOptions.IDEMPOTENT
    service.method.add(name="Peek", input_type=".tests.heist.vault.v1.OpenRequest",
                       output_type=".tests.heist.vault.v1.OpenResponse")  # fmt: skip
    pool = descriptor_pool.Default()
    pool.Add(file)
    methods = pool.FindServiceByName("tests.heist.vault.v1.VaultService").methods_by_name
    assert approval_required(methods["Open"]) and is_idempotent(methods["Open"])
    assert not approval_required(methods["Peek"]) and not is_idempotent(methods["Peek"])
    assert not approval_required(contract_of("calculator").descriptor.methods_by_name["Evaluate"])


def test_require_approval_names_only_the_agents_own_tools() -> None:
    agent = {"name": "mole", "role": "Inside Man", "system_prompt": "x", "tools": ["database_query"]}
    assert AgentConfig.model_validate({**agent, "require_approval": ["database_query"]}).require_approval == (
        "database_query",
    )
    with pytest.raises(ValueError, match="not among the agent's tools"):
        AgentConfig.model_validate({**agent, "require_approval": ["calculator"]})
