"""Tool-call arguments that cannot be malformed: grammars and JSON schemas from the contracts.

Why: the embedded 270M model, prefilled with ``[TOOL:<tool>:``, writes an
argument that the service then rejects (unbalanced parentheses, a file that
does not exist, a column the table does not have). The contract already says
what an argument may be (the ``heist.tools.v1.argument_constraint`` field
option), and the services report at run time what exists (``ListFiles``,
``ListTables``). This module turns both into

* a llama.cpp GBNF grammar for the inline argument, i.e. everything the model
  writes after ``[TOOL:<tool>:`` up to and including the closing ``]``, so a
  constrained sampler can only produce arguments of the right shape over real
  names; and
* a JSON schema of the request message with that field constrained (``enum``
  of names, or a ``pattern`` rendered from the very same grammar), for
  function calling.

The core is pure (descriptors and listings in, text out). ``ConstraintCache``
adds the one impure part: it asks a caller-supplied fetcher for the listings
and rebuilds a constraint only when a listing's fingerprint changes.

Why the grammars are not recursive: a recursive rule cannot bound the length
of what it accepts, and a bound is what lets a caller size ``max_tokens`` so
that a constrained argument can always be finished (``max_bytes``). Nesting is
therefore unrolled to a fixed depth (still balanced by construction).

How a transcript turn uses it (one cache per session; the fetcher is the
caller's, with its token, stubs and deadlines)::

    cache = ConstraintCache(registry)                  # in SessionContext
    async def fetch(tool: str, method: MethodDescriptor) -> Message:  # e.g. in ToolCaller, with its token
        request = message_factory.GetMessageClass(method.input_type)()
        rpc = getattr(clients.tool_stubs[tool], method.name)
        return await clients.services[tool].call(method.name, rpc, request, metadata)
    constraint = await cache.inline(tool, fetch)       # None: nothing to name, skip the prefill
    completion = await llm.complete_text(              # llama.cpp servers take "grammar"
        prompt + f" [TOOL:{tool}:", extra_body=constraint.completion_extra_body(),
        max_tokens=max(config.max_tokens, constraint.max_bytes))
    # after NOT_FOUND / "no such column" from the tool: cache.invalidate(tool)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from heist.tools.v1 import options_pb2 as tool_options

from heist_common.tools.gbnf import Chars, Grammar, Node, Ref, Repeat, alt, opt, rule_name, seq, upto
from heist_common.tools.registry import JsonSchema, ToolRegistry, message_schema

__all__ = [
    "ARITHMETIC",
    "ONE_OF_LISTING",
    "SQL_SELECT",
    "ArgumentHint",
    "Bounds",
    "ColumnInfo",
    "ConstraintCache",
    "ConstraintError",
    "Listing",
    "ListingFetcher",
    "NoValidArgument",
    "TableInfo",
    "ToolConstraint",
    "argument_hint",
    "arithmetic_grammar",
    "build_constraint",
    "listing_from_response",
    "names_grammar",
    "sql_grammar",
    "text_grammar",
    "usable_names",
]

ArgumentKind: TypeAlias = tool_options.ArgumentKind.ValueType
ARITHMETIC = tool_options.ARGUMENT_KIND_ARITHMETIC_EXPRESSION
ONE_OF_LISTING = tool_options.ARGUMENT_KIND_ONE_OF_LISTING
SQL_SELECT = tool_options.ARGUMENT_KIND_SQL_SELECT_OVER_TABLES
LISTING_KINDS = frozenset({ONE_OF_LISTING, SQL_SELECT})

ARGUMENT_RULE = "arg"
"""The rule for the argument alone (no marker syntax); ``root`` wraps it for the inline convention."""
INLINE_FORBIDDEN = "]\n"
"""Characters an inline argument cannot contain: the marker ends at ``]`` and the transcript line at a newline."""


class ConstraintError(ValueError):
    """The contract's hint cannot be honoured (no listing method of that name, a bound too small to fit anything)."""


class NoValidArgument(ConstraintError):
    """The listing leaves nothing the argument could name (e.g. no documents): the tool cannot succeed now."""


# ---------------------------------------------------------------------------
# Listings: what the services report, reduced to what a constraint depends on.


@dataclass(frozen=True, slots=True)
class ColumnInfo:
    """One column as ``ListTables`` reports it."""

    name: str
    type: str = ""

    @property
    def literal_kinds(self) -> tuple[bool, bool]:
        """(numeric, text): which literals compare meaningfully with it, after SQLite's type affinity rules."""
        declared = self.type.upper()
        if any(word in declared for word in ("CHAR", "CLOB", "TEXT")):
            return False, True
        if not declared or "BLOB" in declared:
            return True, True
        return True, False


@dataclass(frozen=True, slots=True)
class TableInfo:
    """One table and its columns, in order."""

    name: str
    columns: tuple[ColumnInfo, ...]


@dataclass(frozen=True, slots=True)
class Listing:
    """What a listing method reported: names (``ListFiles``) or tables with columns (``ListTables``)."""

    names: tuple[str, ...] = ()
    tables: tuple[TableInfo, ...] = ()

    def fingerprint(self) -> str:
        """SHA-256 over exactly what the constraint is built from.

        A new document or a schema change changes it; a database rebuilt with
        the same schema, or a document whose text changed, does not, because
        the grammar would come out the same.
        """
        canonical = {
            "names": sorted(self.names),
            "tables": sorted([t.name, [[c.name, c.type] for c in t.columns]] for t in self.tables),
        }
        return hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()


def _first_repeated(response: Message) -> FieldDescriptor:
    descriptor = cast(Descriptor, response.DESCRIPTOR)  # the stubs also allow upb's own class
    for fd in descriptor.fields:
        if fd.is_repeated:
            return fd
    raise ConstraintError(f"{response.DESCRIPTOR.full_name} has no repeated field to list from")


def listing_from_response(kind: ArgumentKind, response: Message) -> Listing:
    """Read a listing method's response in the shape the argument kind documents (see options.proto)."""
    fd = _first_repeated(response)
    items: Sequence[Any] = getattr(response, fd.name)
    if kind == ONE_OF_LISTING:
        if fd.type == FieldDescriptor.TYPE_STRING:
            return Listing(names=tuple(items))
        if fd.message_type is not None and "name" in fd.message_type.fields_by_name:
            return Listing(names=tuple(item.name for item in items))
        raise ConstraintError(f"{response.DESCRIPTOR.full_name}.{fd.name} lists neither strings nor named messages")
    if kind == SQL_SELECT:
        element = fd.message_type
        if element is None or not {"name", "columns"} <= set(element.fields_by_name):
            raise ConstraintError(f"{response.DESCRIPTOR.full_name}.{fd.name} does not list tables with columns")
        return Listing(
            tables=tuple(
                TableInfo(item.name, tuple(ColumnInfo(c.name, getattr(c, "type", "")) for c in item.columns))
                for item in items
            )
        )
    raise ConstraintError(f"argument kind {tool_options.ArgumentKind.Name(kind)} has no listing")


# ---------------------------------------------------------------------------
# The contract's hint.


@dataclass(frozen=True, slots=True)
class ArgumentHint:
    """What the contract says about a method's inline argument."""

    field: FieldDescriptor
    kind: ArgumentKind
    """An ``heist.tools.v1.ArgumentKind`` value (UNSPECIFIED when the field has no hint)."""
    listing_method: MethodDescriptor | None
    max_length: int | None

    @property
    def kind_name(self) -> str:
        """The kind without its enum prefix, e.g. ``ARITHMETIC_EXPRESSION``."""
        return tool_options.ArgumentKind.Name(self.kind).removeprefix("ARGUMENT_KIND_")


def _inline_field(method: MethodDescriptor) -> FieldDescriptor | None:
    """Return the single string field the inline convention fills (same rule as ``ToolMethod.inline_request``)."""
    strings = [fd for fd in method.input_type.fields if fd.type == FieldDescriptor.TYPE_STRING]
    return strings[0] if len(strings) == 1 and not strings[0].is_repeated else None


def argument_hint(method: MethodDescriptor) -> ArgumentHint | None:
    """Read the ``argument_constraint`` option of a method's inline field; None if it cannot be called inline."""
    fd = _inline_field(method)
    if fd is None:
        return None
    option = fd.GetOptions().Extensions[tool_options.argument_constraint]
    listing: MethodDescriptor | None = None
    if option.kind in LISTING_KINDS:
        service = method.containing_service
        listing = service.methods_by_name.get(option.listing_method)
        if listing is None:
            raise ConstraintError(
                f"{fd.full_name}: listing_method {option.listing_method!r} is not a method of {service.full_name}"
            )
        if listing.input_type.fields:
            raise ConstraintError(f"{listing.full_name}: a listing method must take an empty request")
    return ArgumentHint(fd, option.kind, listing, option.max_length or None)


# ---------------------------------------------------------------------------
# Grammars for the argument alone (rule ``arg``); ``_inline`` adds the marker's end.


@dataclass(frozen=True, slots=True)
class Bounds:
    """How long an argument may be: ``max_length`` characters (the contract), ``max_bytes`` bytes (a token budget)."""

    max_length: int | None = None
    max_bytes: int | None = None

    def fits(self, grammar: Grammar) -> bool:
        """Whether every argument the grammar accepts is within both bounds."""
        chars, size = grammar.max_chars(ARGUMENT_RULE), grammar.max_bytes(ARGUMENT_RULE)
        return (self.max_length is None or (chars is not None and chars <= self.max_length)) and (
            self.max_bytes is None or (size is not None and size <= self.max_bytes)
        )

    def admits(self, text: str) -> bool:
        """Whether one literal argument is within both bounds."""
        return (self.max_length is None or len(text) <= self.max_length) and (
            self.max_bytes is None or len(text.encode()) <= self.max_bytes
        )

    def __str__(self) -> str:
        """Say the bounds in words, for error messages."""
        parts = [f"{self.max_length} characters" if self.max_length is not None else ""]
        parts.append(f"{self.max_bytes} bytes" if self.max_bytes is not None else "")
        return " and ".join(part for part in parts if part) or "no bound"


@dataclass(frozen=True, slots=True)
class ArithmeticShape:
    """How far an expression may go: terms per nesting level (outermost first) and digits per number."""

    terms_per_level: tuple[int, ...]
    int_digits: int
    frac_digits: int


ARITHMETIC_SHAPES = (
    ArithmeticShape((4, 4, 3), 7, 3),
    ArithmeticShape((4, 3, 2), 7, 3),
    ArithmeticShape((4, 3, 2), 5, 2),
    ArithmeticShape((3, 3, 2), 5, 2),
    ArithmeticShape((4, 3), 5, 2),
    ArithmeticShape((3, 2), 4, 2),
    ArithmeticShape((3, 2), 4, 0),
    ArithmeticShape((3, 2), 3, 0),
    ArithmeticShape((4,), 4, 2),
    ArithmeticShape((2,), 3, 0),
    ArithmeticShape((1,), 1, 0),
)
"""Richest first; ``arithmetic_grammar`` takes the first whose longest expression fits the length bound."""


def _arithmetic(shape: ArithmeticShape) -> Grammar:
    integer = alt(["0", seq(Chars.of("1-9"), upto(Chars.of("0-9"), shape.int_digits - 1))])
    fraction = opt(seq(".", Repeat(Chars.of("0-9"), 1, shape.frac_digits))) if shape.frac_digits else None
    rules: dict[str, Node] = {
        "number": seq(integer, fraction),
        "op": seq(opt(" "), alt(["+", "-", "*", "/", "//", "%", "**"]), opt(" ")),
    }
    depth = len(shape.terms_per_level)
    for level, terms in enumerate(reversed(shape.terms_per_level)):  # innermost level first
        inner: Node = Ref("number")
        if level:
            inner = alt([Ref("number"), seq("(", Ref(f"expr-{level - 1}"), ")")])
        rules[f"term-{level}"] = seq(opt("-"), inner)
        rules[f"expr-{level}"] = seq(Ref(f"term-{level}"), upto(seq(Ref("op"), Ref(f"term-{level}")), terms - 1))
    rules[ARGUMENT_RULE] = Ref(f"expr-{depth - 1}")
    return Grammar(rules, ARGUMENT_RULE)


def arithmetic_grammar(max_length: int | None = None, *, max_bytes: int | None = None) -> Grammar:
    """Numbers, ``+ - * / // % **``, unary minus and balanced parentheses, as Python's ``ast`` parses them.

    Integers have no leading zeros (Python rejects ``007``), operators may
    have one space either side, and nesting depth, terms per level and digits
    per number are bounded so that every accepted expression fits ``max_length``
    characters and ``max_bytes`` bytes. What a grammar cannot know stays the
    service's to refuse: division by zero, or a power beyond its exponent bound.
    """
    bounds = Bounds(max_length, max_bytes)
    for shape in ARITHMETIC_SHAPES:
        grammar = _arithmetic(shape)
        if bounds.fits(grammar):
            return grammar
    raise ConstraintError(f"no arithmetic expression fits in {bounds}")


def _usable_inline(name: str) -> bool:
    """Whether a name can stand as an inline argument (the marker regex strips spaces and stops at ``]``)."""
    return bool(name) and name == name.strip() and name.isprintable() and not set(name) & set(INLINE_FORBIDDEN)


def usable_names(names: Iterable[str], max_length: int | None = None, *, max_bytes: int | None = None) -> list[str]:
    """Return the names an inline argument can carry within the bounds, sorted."""
    bounds = Bounds(max_length, max_bytes)
    return sorted({name for name in names if _usable_inline(name) and bounds.admits(name)})


def names_grammar(names: Iterable[str], max_length: int | None = None, *, max_bytes: int | None = None) -> Grammar:
    """Exactly one of ``names`` (those that fit the bounds and the inline convention), longest first.

    NoValidArgument if none is left.
    """
    usable = sorted(usable_names(names, max_length, max_bytes=max_bytes), key=lambda name: (-len(name), name))
    if not usable:
        raise NoValidArgument("the listing names nothing that can be requested")
    return Grammar({ARGUMENT_RULE: alt(usable)}, ARGUMENT_RULE)


def text_grammar(max_length: int | None = None, *, max_bytes: int | None = None) -> Grammar:
    """Any one-line text without ``]``: the fallback when the contract (or a missing listing) says no more.

    Under a byte budget the text is printable ASCII (one byte per character),
    so that the budget does not cost three quarters of the length.
    """
    if max_bytes is None:
        body = Chars.of(INLINE_FORBIDDEN + "\r", negated=True)
        return Grammar({ARGUMENT_RULE: Repeat(body, 1, max_length)}, ARGUMENT_RULE)
    ascii_printable = Chars(((" ", "\\"), ("^", "~")))  # 0x20-0x7E without "]"
    most = max_bytes if max_length is None else min(max_length, max_bytes)
    if most < 1:
        raise ConstraintError(f"no text fits in {max_bytes} bytes")
    return Grammar({ARGUMENT_RULE: Repeat(ascii_printable, 1, most)}, ARGUMENT_RULE)


_PLAIN_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SQL_RESERVED_WORDS = """ABORT ACTION ADD ALL ALTER AND AS ASC BETWEEN BY CASE CAST CHECK COLLATE COLUMN CONSTRAINT
CREATE CROSS CURRENT_DATE CURRENT_TIME CURRENT_TIMESTAMP DEFAULT DELETE DESC DISTINCT DROP ELSE END ESCAPE EXCEPT
EXISTS FOREIGN FROM FULL GLOB GROUP HAVING IN INDEX INNER INSERT INTERSECT INTO IS ISNULL JOIN KEY LEFT LIKE LIMIT
MATCH NATURAL NOT NOTNULL NULL OF OFFSET ON OR ORDER OUTER PRIMARY REFERENCES REGEXP RIGHT ROWID SELECT SET TABLE
THEN TO UNION UNIQUE UPDATE USING VALUES WHEN WHERE WITH"""
_SQL_RESERVED = frozenset(_SQL_RESERVED_WORDS.split())
"""Keywords that cannot stand as a bare identifier (the common SQLite ones): such names are double-quoted."""


def _sql_identifier(name: str) -> str:
    """Spell an identifier as SQL needs it: bare when plain, else double-quoted."""
    if _PLAIN_IDENTIFIER.fullmatch(name) and name.upper() not in _SQL_RESERVED:
        return name
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True, slots=True)
class SqlShape:
    """How far a SELECT may go: columns listed, WHERE conditions, literal sizes, ORDER BY and LIMIT."""

    max_columns: int | None
    max_conditions: int
    literal_chars: int
    number_digits: int
    order_by: bool = True
    limit: bool = True


SQL_SHAPES = (
    SqlShape(None, 2, 40, 9),
    SqlShape(4, 2, 24, 6),
    SqlShape(3, 1, 16, 4),
    SqlShape(2, 1, 10, 3),
    SqlShape(2, 1, 8, 3, order_by=False),
    SqlShape(1, 1, 6, 2, order_by=False, limit=False),
    SqlShape(2, 0, 0, 0, order_by=False),
    SqlShape(1, 0, 0, 0, order_by=False, limit=False),
)
"""Richest first; ``sql_grammar`` takes the first whose longest statement fits the length bound."""

_COMPARISONS = (" = ", " != ", " < ", " <= ", " > ", " >= ")


def _sql(tables: Sequence[TableInfo], shape: SqlShape) -> Grammar:
    digits = shape.number_digits
    fraction = 4 if digits >= 6 else 2 if digits >= 4 else 0
    rules: dict[str, Node] = {}
    if shape.limit:
        rules["limit"] = seq(" LIMIT ", Chars.of("1-9"), upto(Chars.of("0-9"), 2))
    if digits:
        rules["compare"] = alt(_COMPARISONS)
        rules["number"] = seq(
            opt("-"),
            alt(["0", seq(Chars.of("1-9"), upto(Chars.of("0-9"), digits - 1))]),
            opt(seq(".", Repeat(Chars.of("0-9"), 1, fraction))) if fraction else None,
        )
    if shape.literal_chars:
        text_char = Chars.of("'\\" + INLINE_FORBIDDEN + "\r", negated=True)
        rules["compare-text"] = alt([*_COMPARISONS, " LIKE "])
        rules["text"] = seq("'", Repeat(text_char, 0, shape.literal_chars), "'")
    queries: list[Node] = []
    for table in tables:
        columns = [c for c in table.columns if _usable_inline(_sql_identifier(c.name))]
        name = rule_name("t", table.name)
        selected: list[Node | str] = ["*", "COUNT(*)"]
        conditions: list[Node] = []
        if columns:
            rules[f"{name}-col"] = alt(_sql_identifier(c.name) for c in columns)
            most = len(columns) if shape.max_columns is None else min(shape.max_columns, len(columns))
            selected.append(seq(Ref(f"{name}-col"), upto(seq(", ", Ref(f"{name}-col")), most - 1)))
            numeric = [_sql_identifier(c.name) for c in columns if c.literal_kinds[0]]
            text = [_sql_identifier(c.name) for c in columns if c.literal_kinds[1]]
            if numeric and digits:
                conditions.append(seq(alt(numeric), Ref("compare"), Ref("number")))
            if text and shape.literal_chars:
                conditions.append(seq(alt(text), Ref("compare-text"), Ref("text")))
        tail: list[Node] = []
        if conditions and shape.max_conditions:
            rules[f"{name}-cond"] = alt(conditions)
            where = seq(
                " WHERE ",
                Ref(f"{name}-cond"),
                upto(seq(" AND ", Ref(f"{name}-cond")), shape.max_conditions - 1),
            )
            tail.append(opt(where))
        if columns and shape.order_by:
            tail.append(opt(seq(" ORDER BY ", Ref(f"{name}-col"), opt(alt([" ASC", " DESC"])))))
        if shape.limit:
            tail.append(opt(Ref("limit")))
        rules[name] = seq(alt(selected), " FROM ", _sql_identifier(table.name), *tail)
        queries.append(Ref(name))
    rules[ARGUMENT_RULE] = seq("SELECT ", alt(queries))
    return Grammar(rules, ARGUMENT_RULE)


def sql_grammar(tables: Iterable[TableInfo], max_length: int | None = None, *, max_bytes: int | None = None) -> Grammar:
    """One ``SELECT <columns> FROM <table> [WHERE ...] [ORDER BY <column> [ASC|DESC]] [LIMIT n]``.

    One alternative per table, so the columns named are always the chosen
    table's own (the model writes the columns first, and the table it may then
    name is one that has them all). WHERE compares a column with a literal of
    its type (numbers for numeric columns, quoted text for text ones).
    NoValidArgument if no table can be named.
    """
    usable = sorted(
        (t for t in tables if _usable_inline(_sql_identifier(t.name))), key=lambda t: (-len(t.name), t.name)
    )
    if not usable:
        raise NoValidArgument("the listing names no table that can be queried")
    bounds = Bounds(max_length, max_bytes)
    for shape in SQL_SHAPES:
        grammar = _sql(usable, shape)
        if bounds.fits(grammar):
            return grammar
    raise ConstraintError(f"no SELECT over these tables fits in {bounds}")


# ---------------------------------------------------------------------------
# Constraints.


@dataclass(frozen=True, slots=True)
class ToolConstraint:
    """How to constrain a model's call of one tool method, in both dialects."""

    tool: str
    method: str
    form: Literal["inline", "json"]
    """``inline``: ``gbnf`` covers what follows ``[TOOL:<tool>:`` through ``]``. ``json``: the arguments object."""
    gbnf: str
    json_schema: JsonSchema
    """The request message's schema, the argument field constrained (function-calling ``parameters``)."""
    kind: str
    """The contract's argument kind (``ARITHMETIC_EXPRESSION``, ...; ``UNSPECIFIED`` without a hint)."""
    max_bytes: int | None
    """Longest text the grammar accepts (None: unbounded). A sampled token is at least one byte, so
    ``max_tokens >= max_bytes`` guarantees a constrained argument is always finished."""
    listing_fingerprint: str | None = None
    """Fingerprint of the listing it was built from (None: built without one)."""

    def completion_extra_body(self) -> dict[str, Any]:
        """Body fields for a ``/v1/completions`` request to llama.cpp's servers (both take ``grammar``)."""
        return {"grammar": self.gbnf}


def _inline(argument: Grammar) -> Grammar:
    """Wrap the argument as the inline marker continues it: an optional space (the regex strips it), then ``]``."""
    rules = dict(argument.rules)
    rules["root"] = seq(opt(" "), Ref(ARGUMENT_RULE), "]")
    return Grammar(rules, "root")


INLINE_OVERHEAD_BYTES = 2
"""What the inline continuation adds to the argument: an optional leading space and the closing ``]``."""


def _argument(hint: ArgumentHint, listing: Listing | None, bounds: Bounds) -> tuple[Grammar, JsonSchema]:
    """Build the argument's grammar and the field's JSON schema (``enum``, or a ``pattern`` from the same grammar)."""
    limits = {"max_length": bounds.max_length, "max_bytes": bounds.max_bytes}
    if hint.kind == ARITHMETIC:
        grammar = arithmetic_grammar(**limits)
    elif hint.kind == ONE_OF_LISTING and listing is not None:
        grammar = names_grammar(listing.names, **limits)
        return grammar, {"type": "string", "enum": usable_names(listing.names, **limits)}
    elif hint.kind == SQL_SELECT and listing is not None:
        grammar = sql_grammar(listing.tables, **limits)
    else:
        grammar = text_grammar(**limits)
    schema: JsonSchema = {"type": "string", "pattern": f"^({grammar.to_regex()})$"}
    longest = grammar.max_chars(ARGUMENT_RULE)
    if longest is not None:
        schema["maxLength"] = longest
    return grammar, schema


def build_constraint(
    tool: str, method: MethodDescriptor, listing: Listing | None = None, *, max_bytes: int | None = None
) -> ToolConstraint:
    """Build the constraint for one tool method: pure, no network.

    ``listing`` is the parsed response of the method the contract names (None:
    not fetched, or the service is down; the argument then falls back to any
    one-line text). The argument stays within the contract's ``max_length``;
    ``max_bytes`` (e.g. the turn's ``max_tokens``) also bounds the whole inline
    continuation, space and ``]`` included, so that sampling at most that many
    tokens always finishes the marker. Methods that cannot be called inline get
    the grammar of their JSON arguments, converted from the request's schema by
    llama.cpp's own converter (needs llama-cpp-python). Raises NoValidArgument
    when the listing leaves nothing to name, ConstraintError when nothing fits.
    """
    hint = argument_hint(method)
    schema = message_schema(method.input_type)
    if hint is None:
        return ToolConstraint(tool, method.name, "json", _json_gbnf(schema), schema, "UNSPECIFIED", None)
    bounds = Bounds(hint.max_length, None if max_bytes is None else max_bytes - INLINE_OVERHEAD_BYTES)
    grammar, field_schema = _argument(hint, listing if hint.kind in LISTING_KINDS else None, bounds)
    described = schema["properties"][hint.field.name]
    if "description" in described:
        field_schema["description"] = described["description"]
    schema["properties"][hint.field.name] = field_schema
    inline = _inline(grammar)
    return ToolConstraint(
        tool=tool,
        method=method.name,
        form="inline",
        gbnf=inline.to_gbnf(),
        json_schema=schema,
        kind=hint.kind_name,
        max_bytes=inline.max_bytes(),
        listing_fingerprint=listing.fingerprint() if listing is not None and hint.kind in LISTING_KINDS else None,
    )


def _json_gbnf(schema: JsonSchema) -> str:
    """GBNF for a JSON arguments object, by llama.cpp's converter (imported late: an optional dependency)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    gbnf: str = json_schema_to_gbnf(json.dumps(schema))
    return gbnf


# ---------------------------------------------------------------------------
# One session's cache.

ListingFetcher = Callable[[str, MethodDescriptor], Awaitable[Message]]
"""Calls a listing method: ``await fetch("file_reader", <ListFiles descriptor>)`` returns its response.

The caller owns transport and authorization (stub, deadline, the agent's token);
any exception means "no listing this time".
"""


@dataclass(slots=True)
class _Entry:
    constraint: ToolConstraint | None
    fingerprint: str | None
    checked_at: float


@dataclass(slots=True)
class CacheStats:
    """What the cache did, for logs and tests."""

    fetches: int = 0
    builds: int = 0
    fetch_errors: dict[str, str] = field(default_factory=dict)
    """Per tool: why its last listing fetch failed (cleared by the next success)."""
    build_errors: dict[str, str] = field(default_factory=dict)
    """Per tool: why no grammar fits ``max_bytes`` (the tool then goes unconstrained)."""


class ConstraintCache:
    """One session's constraints, each rebuilt only when its listing's fingerprint changed.

    A listing is re-fetched at most every ``max_age_s``. Why a cache: building
    a SQL grammar costs about a millisecond and a listing an RPC; a turn needs
    the constraint before it samples a token.
    Why a fingerprint: a new document or a changed schema must reach the next
    turn, while an unchanged listing must not cost a rebuild. ``invalidate``
    forces a re-fetch, e.g. after a call failed with NOT_FOUND or
    ``no such column`` (a sign the listing changed under us). A failed fetch
    keeps the last good constraint; with none yet, the constraint is built
    without a listing (plain one-line text) and the fetch is retried after
    ``max_age_s``. ``max_bytes`` is passed to ``build_constraint`` (a turn's
    ``max_tokens``); None keeps the contract's bounds, and the caller then
    samples up to ``constraint.max_bytes`` tokens.
    """

    def __init__(
        self,
        registry: ToolRegistry,
        *,
        max_age_s: float = 30.0,
        max_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._max_age_s = max_age_s
        self._max_bytes = max_bytes
        self._clock = clock
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.stats = CacheStats()

    async def inline(self, tool: str, fetch: ListingFetcher | None) -> ToolConstraint | None:
        """Return the constraint for ``tool``'s inline method; None if it has none or nothing can be named now."""
        method = self._registry.service(tool).inline_method
        if method is None:
            return None
        return await self.get(tool, method.method.name, fetch)

    async def get(self, tool: str, method_name: str, fetch: ListingFetcher | None) -> ToolConstraint | None:
        """Return the constraint for one method, fresh within ``max_age_s``; None if nothing can be named now."""
        key = (tool, method_name)
        entry = self._entries.get(key)
        if entry is not None and self._clock() - entry.checked_at < self._max_age_s:
            return entry.constraint
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            entry = self._entries.get(key)  # another agent may have refreshed it while we waited
            if entry is not None and self._clock() - entry.checked_at < self._max_age_s:
                return entry.constraint
            return await self._refresh(tool, method_name, fetch, entry)

    def invalidate(self, tool: str | None = None) -> None:
        """Re-fetch the listings of ``tool`` (every tool if None) on next use."""
        for key, entry in self._entries.items():
            if tool is None or key[0] == tool:
                entry.checked_at = float("-inf")

    async def _refresh(
        self, tool: str, method_name: str, fetch: ListingFetcher | None, entry: _Entry | None
    ) -> ToolConstraint | None:
        method = self._registry.service(tool).descriptor.methods_by_name[method_name]
        hint = argument_hint(method)
        listing: Listing | None = None
        now = self._clock()
        if hint is not None and hint.listing_method is not None:
            if fetch is None:
                if entry is not None:
                    return entry.constraint
            else:
                self.stats.fetches += 1
                try:
                    listing = listing_from_response(hint.kind, await fetch(tool, hint.listing_method))
                except Exception as exc:  # a listing failure must never cost the turn
                    self.stats.fetch_errors[tool] = f"{type(exc).__name__}: {exc}"
                    if entry is not None:  # the last good constraint (or the listing-free one) stands
                        entry.checked_at = now
                        return entry.constraint
                else:
                    self.stats.fetch_errors.pop(tool, None)
            fingerprint = listing.fingerprint() if listing is not None else None
            if entry is not None and entry.fingerprint == fingerprint:
                entry.checked_at = now
                return entry.constraint
        elif entry is not None:
            entry.checked_at = float("inf")  # nothing at run time can change it
            return entry.constraint
        self.stats.builds += 1
        constraint: ToolConstraint | None = None
        try:
            constraint = build_constraint(tool, method, listing, max_bytes=self._max_bytes)
        except NoValidArgument:
            pass  # nothing to name now: no constraint, and no marker worth prefilling
        except ConstraintError as exc:
            self.stats.build_errors[tool] = str(exc)
        else:
            self.stats.build_errors.pop(tool, None)
        fingerprint = listing.fingerprint() if listing is not None else None
        static = hint is None or hint.listing_method is None
        self._entries[(tool, method_name)] = _Entry(constraint, fingerprint, float("inf") if static else now)
        return constraint
