"""Constrained tool calls in a running session: which dialect a request carries, and the once-per-run fallback.

``heist_common.tools.argument_grammars`` derives a grammar and a JSON schema per tool method
from the contract and the services' listings; this module decides, per
``llm.constrained_tools``, which of them a request carries:

* ``grammar``: llama.cpp's GBNF ``grammar`` field, for the argument of an open
  ``[TOOL:<tool>:`` marker in a transcript line (``CrewAgent`` generates the
  argument alone under it, then lets the line continue freely), and for a chat
  reply with inline markers (``reply_grammar``: a chat server cannot continue
  from an open marker, so the whole reply carries it);
* ``json_schema``: the derived schemas as strict tool definitions
  (``"strict": true``) for native function calling;
* ``auto``: whichever fits the turn. A server that rejects the field (HTTP 400
  or 422 naming it) costs one request: the same request is sent again without
  it, the dialect is dropped for the rest of the session (a run is one
  session), and the fallback is audited once as an ``events`` row
  (``llm``/``constrained_tools``) and logged;
* ``off``: neither (the behaviour before constraints).

An explicit ``grammar`` or ``json_schema`` never falls back: the user asked for
it, so a rejection is an LLM error of the turn like any other.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from typing import Any, Literal

from heist_common.audit import EventRow
from heist_common.config import ConstrainedToolsMode
from heist_common.tools.argument_grammars import (
    ConstraintCache,
    ConstraintError,
    ListingFetcher,
    ToolConstraint,
    argument_hint,
)
from heist_common.tools.registry import JsonSchema, ToolMethod, ToolRegistry
from orchestrator.llm.client import LLMError
from orchestrator.mesh.clients import ServiceCallError
from orchestrator.tools import markers

__all__ = [
    "FALLBACK_OPERATION",
    "ConstrainedTools",
    "Dialect",
    "accepts",
    "listing_changed",
    "rejects_field",
    "reply_grammar",
    "strict_schema",
]

log = logging.getLogger("heist.orchestrator.constrained")

Dialect = Literal["grammar", "json_schema"]
FALLBACK_OPERATION = "constrained_tools"
"""``events.operation`` of the one row that says a session went on unconstrained."""
REJECTION_STATUSES = frozenset({"HTTP 400", "HTTP 422"})
REJECTED_FIELDS: dict[Dialect, tuple[str, ...]] = {
    "grammar": ("grammar",),
    "json_schema": ("strict", "schema", "pattern", "maxlength", "tools"),
}
"""Words a server's rejection names for each dialect (OpenAI: "Unrecognized request argument supplied: grammar",
"Invalid schema for function ...: 'pattern' is not permitted"; pydantic servers name the field's location)."""


def rejects_field(exc: LLMError, dialect: Dialect) -> bool:
    """Whether an LLM error is the server refusing the dialect's field (and not, say, a too-long prompt)."""
    detail = exc.detail.lower()
    return exc.status_code in REJECTION_STATUSES and any(word in detail for word in REJECTED_FIELDS[dialect])


def listing_changed(exc: ServiceCallError) -> bool:
    """Whether a tool's refusal suggests its listing changed under us (a file gone, no such table or column)."""
    return exc.status_code == "NOT_FOUND" or (exc.status_code == "INVALID_ARGUMENT" and "no such" in exc.detail)


def strict_schema(schema: JsonSchema) -> JsonSchema:
    """Make a function's parameters fit OpenAI's strict mode: every property required, optional ones nullable.

    Strict mode accepts only objects that list all their properties as
    required and allow no others; a field the contract leaves optional becomes
    ``[type, "null"]`` (protobuf's JSON parser reads ``null`` as "not set").
    """
    result = dict(schema)
    properties = schema.get("properties")
    if isinstance(properties, dict):
        required = set(schema.get("required", ()))
        strict_properties: dict[str, Any] = {}
        for name, value in properties.items():
            prop = strict_schema(value) if isinstance(value, dict) else value
            if name not in required and isinstance(prop.get("type"), str):
                prop = {**prop, "type": [prop["type"], "null"]}
            strict_properties[name] = prop
        result["properties"] = strict_properties
        result["required"] = list(properties)
        result["additionalProperties"] = False
    items = schema.get("items")
    if isinstance(items, dict):
        result["items"] = strict_schema(items)
    return result


_GBNF_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|[A-Za-z][A-Za-z0-9-]*|\s+|.')
"""A GBNF body's tokens: string literals and character classes (left alone), rule names, anything else."""
MAX_REPLY_MARKERS = 2
"""Tool markers a constrained chat reply may contain."""


def _prefixed(gbnf: str, prefix: str) -> str:
    """Rename every rule of a grammar (one rule a line, as ``tools.gbnf`` writes them) to ``prefix``-name."""
    rules = [line.partition(" ::= ") for line in gbnf.splitlines() if " ::= " in line]
    names = {name for name, _, _ in rules}
    renamed = (
        f"{prefix}{name} ::= "
        + "".join(f"{prefix}{token}" if token in names else token for token in _GBNF_TOKEN.findall(body))
        for name, _, body in rules
    )
    return "\n".join(renamed)


def reply_grammar(constraints: list[ToolConstraint]) -> str:
    """GBNF for a whole chat reply: free text with at most two ``[TOOL:<tool>:<argument>]`` markers, each constrained.

    Why the whole reply: a chat server cannot be asked to continue from an open
    marker, so the marker's constraint has to ride along from the first token.
    Outside markers the text may say anything but ``[``, so that no marker
    escapes its grammar.
    """
    tools = []
    rules = []
    for index, constraint in enumerate(constraints):
        prefix = f"t{index}-"
        rules.append(_prefixed(constraint.gbnf, prefix))
        tools.append(f'"{constraint.tool}:" {prefix}root')
    head = [
        f"root ::= text (marker text){{0,{MAX_REPLY_MARKERS}}}",
        "text ::= [^[]*",
        f'marker ::= "{markers.OPEN}" ({" | ".join(tools)})',
    ]
    return "\n".join([*head, *rules]) + "\n"


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def accepts(constraint: ToolConstraint, argument: str) -> bool:
    """Whether an inline argument the model wrote unconstrained is one the constraint would have allowed.

    Checked against the field's ``enum`` or ``pattern`` in the constraint's
    JSON schema, which are rendered from the same grammar; such an argument is
    kept as written instead of being generated again.
    """
    for field_schema in constraint.json_schema.get("properties", {}).values():
        if "enum" in field_schema:
            return argument in field_schema["enum"]
        if "pattern" in field_schema:
            return _compiled(field_schema["pattern"]).fullmatch(argument) is not None
    return False


@dataclass(slots=True)
class _Fallback:
    reason: str
    recorded: bool = False


class ConstrainedTools:
    """One session's constraints (cached, see ``ConstraintCache``) and which dialects the server still takes."""

    def __init__(self, mode: ConstrainedToolsMode, registry: ToolRegistry, *, max_bytes: int | None) -> None:
        self.mode = mode
        self.registry = registry
        self.cache = ConstraintCache(registry, max_bytes=max_bytes)
        self._rejected: dict[Dialect, _Fallback] = {}
        self._broken: set[str] = set()
        self._strict: dict[tuple[str, ...], tuple[list[ToolConstraint | None], list[dict[str, Any]]]] = {}
        """Per list of functions: the constraints the strict definitions were built from, and the definitions."""

    def active(self, dialect: Dialect) -> bool:
        """Whether requests should carry ``dialect`` (per the mode, and not rejected earlier in the run)."""
        return self.mode in (dialect, "auto") and dialect not in self._rejected

    @property
    def fallbacks(self) -> dict[str, str]:
        """Dialects dropped in this session, with the server's reason."""
        return {dialect: fallback.reason for dialect, fallback in self._rejected.items()}

    def fall_back(self, dialect: Dialect, exc: LLMError, turn_id: int, agent: str) -> EventRow | None:
        """Drop ``dialect`` if ``exc`` is the server rejecting it under ``auto``.

        Returns the audit row for the first such rejection of the run, None for
        later ones (a concurrent request may have seen it too). Raises ``exc``
        again when it is not a rejection the mode may absorb.
        """
        if self.mode != "auto" or not rejects_field(exc, dialect):
            raise exc
        fallback = self._rejected.setdefault(dialect, _Fallback(f"{exc.status_code}: {exc.detail}"))
        if fallback.recorded:
            return None
        fallback.recorded = True
        detail = (
            f"the LLM server rejected constrained tool arguments ({dialect}: {fallback.reason}); "
            "tool arguments are unconstrained for the rest of the run"
        )
        log.warning("%s", detail)
        return EventRow("llm", FALLBACK_OPERATION, exc.status_code, detail, round(exc.latency_ms, 3), turn_id, agent)

    async def inline(self, tool: str, fetch: ListingFetcher | None) -> ToolConstraint | None:
        """Return the grammar for ``tool``'s inline argument when requests carry grammars now; else None."""
        if not self.active("grammar"):
            return None
        return await self._hinted(tool, fetch)

    async def _hinted(
        self, tool: str, fetch: ListingFetcher | None, method: ToolMethod | None = None
    ) -> ToolConstraint | None:
        """Return ``method``'s constraint (default: ``tool``'s inline method) if its contract hints one; else None.

        A method without a hint has nothing to add to its request's schema (and
        its JSON grammar would need llama-cpp-python, which a container without
        the embedded model lacks). A contract whose hint cannot be honoured is a
        bug its tests catch; at run time it costs the constraint, not the turn.
        """
        method = method or self.registry.service(tool).inline_method
        if method is None:
            return None
        try:
            if argument_hint(method.method) is None:
                return None
            return await self.cache.get(tool, method.method.name, fetch)
        except ConstraintError as exc:
            if tool not in self._broken:
                self._broken.add(tool)
                log.warning("no constraint for %s.%s: %s", tool, method.method.name, exc)
            return None

    async def chat_grammar(self, tools: list[str], fetch: ListingFetcher | None) -> str | None:
        """Return the ``grammar`` for a chat reply that may call ``tools`` inline (None: nothing to constrain)."""
        if not self.active("grammar"):
            return None
        constraints = [c for tool in tools if (c := await self._hinted(tool, fetch)) is not None]
        return reply_grammar(constraints) if constraints else None

    async def strict_functions(self, methods: list[ToolMethod], fetch: ListingFetcher | None) -> list[dict[str, Any]]:
        """``tools=[...]`` with the derived schemas as strict definitions (``json_schema``), in ``methods``' order.

        Methods without an argument hint keep their request's schema (their
        constraint would only repeat it), so no grammar converter is needed.
        The list is built again only when a constraint changed (a new listing),
        so every request of a run can carry the very same object (the LLM client
        serializes it once); callers must not modify it.
        """
        constraints = [await self._hinted(method.tool, fetch, method) for method in methods]
        key = tuple(method.function_name for method in methods)
        built = self._strict.get(key)
        if built is not None and all(old is new for old, new in zip(built[0], constraints, strict=True)):
            return built[1]
        functions = []
        for method, constraint in zip(methods, constraints, strict=True):
            parameters = method.parameters if constraint is None else constraint.json_schema
            function = {
                "name": method.function_name,
                "description": method.description,
                "parameters": strict_schema(parameters),
                "strict": True,
            }
            functions.append({"type": "function", "function": function})
        self._strict[key] = (constraints, functions)
        return functions
