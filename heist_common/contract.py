"""The service catalogue, derived from the config's ``services`` keys and the generated contracts.

Convention, not registration: the service called ``<name>`` in the config has
its contract in ``protos/heist/<name>/v1/<name>.proto`` (package
``heist.<name>.v1``, exactly one ``service``) and its servicer in
``servers/<name>.py``. Everything else (its gRPC name, its stub, whether it is a
tool, each method's OAuth scope and the description the model sees) is read
from the descriptors and their options. So nothing outside a tool's own
servicer names a tool, and a new tool is one proto, one servicer and config.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.descriptor_pb2 import MethodOptions
from heist.auth.v1 import options_pb2 as auth_options
from heist.tools.v1 import options_pb2 as tool_options

__all__ = [
    "AUTHORIZATION_METADATA_KEY",
    "CALL_ID_METADATA_KEY",
    "ON_BEHALF_OF_METADATA_KEY",
    "SESSION_ID_PATTERN",
    "SESSION_METADATA_KEY",
    "TRACEPARENT_METADATA_KEY",
    "Catalogue",
    "ContractError",
    "ServiceContract",
    "approval_required",
    "contract_of",
    "is_idempotent",
    "is_inline_default",
    "required_scope",
    "tool_description",
]

SESSION_METADATA_KEY = "x-session-id"
"""Call metadata that carries the heist session ID through every service."""

AUTHORIZATION_METADATA_KEY = "authorization"
"""Call metadata that carries ``Bearer <token>``."""

SESSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
"""What a session ID may look like: it becomes file names, log fields and a token claim."""

CALL_ID_METADATA_KEY = "x-call-id"
"""Call metadata naming one tool call (``<turn>.<index>`` within the session): servers log it, the audit keys on it."""
ON_BEHALF_OF_METADATA_KEY = "x-on-behalf-of"
"""Call metadata a relaying caller (the MCP gateway) sends: the OAuth client it calls for."""

TRACEPARENT_METADATA_KEY = "traceparent"
"""W3C Trace Context: ``00-<trace id>-<span id>-01``; one trace per agent turn."""


class ContractError(LookupError):
    """A configured service has no generated contract where the convention says it should be."""


def required_scope(method: MethodDescriptor) -> str | None:
    """Return the OAuth scope a method requires, or None if it needs no token."""
    scope: str = method.GetOptions().Extensions[auth_options.required_scope]
    return scope or None


def tool_description(method: MethodDescriptor) -> str:
    """Return the model-facing description of a tool method ('' if none)."""
    description: str = method.GetOptions().Extensions[tool_options.tool_description]
    return description


def is_inline_default(method: MethodDescriptor) -> bool:
    """Whether the inline ``[TOOL:name:argument]`` convention calls this method."""
    flag: bool = method.GetOptions().Extensions[tool_options.inline_default]
    return flag


def approval_required(method: MethodDescriptor) -> bool:
    """Whether the contract says every call of this method waits for a person's approval."""
    policy: int = method.GetOptions().Extensions[tool_options.approval]
    return policy == tool_options.APPROVAL_REQUIRED


_REPEATABLE = frozenset({MethodOptions.NO_SIDE_EFFECTS, MethodOptions.IDEMPOTENT})


def is_idempotent(method: MethodDescriptor) -> bool:
    """Whether the contract declares the method safe to call again (protobuf's own ``idempotency_level``).

    A resume sends such a call again when its result was lost; any other call is recorded as ``unknown``.
    """
    return method.GetOptions().idempotency_level in _REPEATABLE


@dataclass(frozen=True)
class ServiceContract:
    """One service as its generated code describes it."""

    name: str
    """The config key (``calculator``); also the proto package's middle part."""
    descriptor: ServiceDescriptor
    messages: ModuleType
    """The ``*_pb2`` module."""
    grpc: ModuleType
    """The ``*_pb2_grpc`` module."""

    @property
    def full_name(self) -> str:
        """The gRPC service name, e.g. ``heist.calculator.v1.CalculatorService``."""
        return self.descriptor.full_name

    @property
    def stub_class(self) -> Any:
        """The generated client stub class."""
        return getattr(self.grpc, f"{self.descriptor.name}Stub")

    def add_servicer(self, servicer: object, server: Any) -> None:
        """Register ``servicer`` with the generated ``add_<Service>Servicer_to_server``."""
        getattr(self.grpc, f"add_{self.descriptor.name}Servicer_to_server")(servicer, server)

    @property
    def tool_methods(self) -> tuple[MethodDescriptor, ...]:
        """Methods the contract offers to models (they carry a ``tool_description``)."""
        return tuple(method for method in self.descriptor.methods if tool_description(method))

    @property
    def is_tool(self) -> bool:
        """Whether agents may use this service as a tool."""
        return bool(self.tool_methods)

    def method_path(self, method: MethodDescriptor) -> str:
        """GRPC's ``/package.Service/Method`` path."""
        return f"/{self.full_name}/{method.name}"

    def scopes_by_method_path(self) -> dict[str, str | None]:
        """Map every method path to the scope it requires (None: no token needed)."""
        return {self.method_path(method): required_scope(method) for method in self.descriptor.methods}

    @property
    def scopes(self) -> tuple[str, ...]:
        """Every scope some method of this service requires."""
        return tuple(sorted({scope for method in self.descriptor.methods if (scope := required_scope(method))}))


@functools.cache
def contract_of(name: str) -> ServiceContract:
    """Load the contract of the service called ``name`` by the convention above; ContractError if absent."""
    package = f"heist.{name}.v1"
    try:
        messages = importlib.import_module(f"{package}.{name}_pb2")
        stubs = importlib.import_module(f"{package}.{name}_pb2_grpc")
    except ImportError as exc:
        raise ContractError(
            f"service {name!r}: no generated contract {package}.{name}_pb2 "
            f"(expected protos/heist/{name}/v1/{name}.proto; run 'make protos'): {exc}"
        ) from None
    services = list(messages.DESCRIPTOR.services_by_name.values())
    if len(services) != 1:
        raise ContractError(f"service {name!r}: {package} must define exactly one service, found {len(services)}")
    return ServiceContract(name, services[0], messages, stubs)


class Catalogue:
    """The contracts of a set of configured services, in config order."""

    def __init__(self, names: Iterable[str]) -> None:
        self.contracts: dict[str, ServiceContract] = {name: contract_of(name) for name in names}

    def __getitem__(self, name: str) -> ServiceContract:
        return self.contracts[name]

    def __contains__(self, name: object) -> bool:
        return name in self.contracts

    @property
    def tools(self) -> dict[str, ServiceContract]:
        """The configured services agents may use as tools."""
        return {name: contract for name, contract in self.contracts.items() if contract.is_tool}

    def grpc_names(self) -> dict[str, str]:
        """Config name -> gRPC full service name (health checks, retry policies)."""
        return {name: contract.full_name for name, contract in self.contracts.items()}
