"""A tiny grammar algebra rendered both as llama.cpp GBNF and as a regular expression.

Why one algebra and two renderings: a constrained tool argument is offered in
two dialects, a GBNF grammar for llama.cpp's sampler and a JSON-schema
``pattern`` for function calling. Written by hand, the two would drift apart;
built once from the same nodes they cannot. The same nodes also give the
longest string a grammar accepts, which is what a caller needs to size
``max_tokens`` so that a constrained argument can always be finished (a
sampled token is at least one byte).

Only non-recursive grammars render as regular expressions; every grammar here
is non-recursive on purpose (see ``heist_common.tools.argument_grammars``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "Alt",
    "Chars",
    "Grammar",
    "GrammarError",
    "Lit",
    "Node",
    "Ref",
    "Repeat",
    "Seq",
    "alt",
    "opt",
    "rule_name",
    "seq",
    "upto",
]


class GrammarError(ValueError):
    """The grammar cannot be rendered as asked (undefined rule, recursion in a regex)."""


@dataclass(frozen=True, slots=True)
class Lit:
    """A literal string."""

    text: str


@dataclass(frozen=True, slots=True)
class Chars:
    """One character from a set of inclusive ranges, or (``negated``) one character outside them."""

    ranges: tuple[tuple[str, str], ...]
    negated: bool = False

    @classmethod
    def of(cls, spec: str, *, negated: bool = False) -> Chars:
        """Build from a compact spec such as ``"0-9"`` or ``"1-9_"`` (a ``-`` between two chars is a range)."""
        ranges: list[tuple[str, str]] = []
        index = 0
        while index < len(spec):
            if index + 2 < len(spec) and spec[index + 1] == "-":
                ranges.append((spec[index], spec[index + 2]))
                index += 3
            else:
                ranges.append((spec[index], spec[index]))
                index += 1
        return cls(tuple(ranges), negated)


@dataclass(frozen=True, slots=True)
class Seq:
    """Items one after the other."""

    items: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Alt:
    """Exactly one of the options."""

    options: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Repeat:
    """``item`` between ``low`` and ``high`` times (both bounds inclusive; ``high`` None is unbounded)."""

    item: Node
    low: int
    high: int | None


@dataclass(frozen=True, slots=True)
class Ref:
    """A reference to a named rule of the grammar."""

    name: str


Node = Lit | Chars | Seq | Alt | Repeat | Ref


def seq(*items: Node | str | None) -> Node:
    """Build a sequence; strings become literals, None items (see ``upto``) are left out, one item stays itself."""
    nodes: list[Node] = []
    for item in items:
        node = Lit(item) if isinstance(item, str) else item
        if node is None:
            continue
        if isinstance(node, Lit) and nodes and isinstance(nodes[-1], Lit):
            nodes[-1] = Lit(nodes[-1].text + node.text)  # "FROM " "guards" reads better as "FROM guards"
        else:
            nodes.append(node)
    if not nodes:
        raise GrammarError("a sequence needs at least one item")
    return nodes[0] if len(nodes) == 1 else Seq(tuple(nodes))


def alt(options: Iterable[Node | str]) -> Node:
    """Build an alternation; strings become literals. At least one option is required."""
    nodes = tuple(Lit(option) if isinstance(option, str) else option for option in options)
    if not nodes:
        raise GrammarError("an alternation needs at least one option")
    return nodes[0] if len(nodes) == 1 else Alt(nodes)


def opt(item: Node | str) -> Repeat:
    """Build an optional item (zero or one time)."""
    return Repeat(Lit(item) if isinstance(item, str) else item, 0, 1)


def upto(item: Node | str, high: int) -> Repeat | None:
    """Build ``item`` zero to ``high`` times; None (left out by ``seq``) when ``high`` is 0."""
    return Repeat(Lit(item) if isinstance(item, str) else item, 0, high) if high > 0 else None


_RULE_NAME = re.compile(r"[^a-zA-Z0-9]+")


def rule_name(*parts: str) -> str:
    """Make a GBNF rule name (letters, digits and dashes) from arbitrary parts, e.g. table names."""
    return "-".join(_RULE_NAME.sub("-", part).strip("-").lower() or "x" for part in parts)


def _gbnf_char(char: str) -> str:
    """One character inside a GBNF literal or class: letters and digits as themselves, the rest escaped."""
    if char.isascii() and char.isalnum():
        return char
    code = ord(char)
    if code < 0x80:
        return f"\\x{code:02X}"
    return f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}"


def _gbnf_literal(text: str) -> str:
    escaped = "".join(
        char if char.isprintable() and char not in '"\\' and (char.isascii() or char.isalnum()) else _gbnf_char(char)
        for char in text
    )
    return f'"{escaped}"'


_REGEX_PLAIN = frozenset(" _,'-%=<>!:;@#&~`")


def _regex_char(char: str, *, in_class: bool = False) -> str:
    r"""Write one character of a regular expression (``in_class``: inside ``[...]``).

    Anything but letters, digits and a few inert marks is written ``\xHH``,
    and outside a class as the class ``[\xHH]``: the one spelling that
    Python's ``re``, ECMAScript (JSON schema) and GBNF all read the same way.
    It matters because llama.cpp's JSON-schema converter copies classes into
    GBNF verbatim but copies other escapes into GBNF literals that break them
    (``\.`` is no GBNF escape, and ``\x2E`` before a class comes out split).
    """
    if char.isalnum() or (char in _REGEX_PLAIN and not (in_class and char == "-")) or not char.isascii():
        return char
    escaped = f"\\x{ord(char):02X}"
    return escaped if in_class else f"[{escaped}]"


@dataclass(frozen=True)
class Grammar:
    """Named rules; ``root`` is where llama.cpp starts."""

    rules: Mapping[str, Node]
    root: str = "root"

    def __post_init__(self) -> None:
        """Refuse references to rules that do not exist (llama.cpp would refuse them later, less clearly)."""
        if self.root not in self.rules:
            raise GrammarError(f"no rule {self.root!r}")
        for name, node in self.rules.items():
            for ref in _refs(node):
                if ref not in self.rules:
                    raise GrammarError(f"rule {name!r} refers to undefined rule {ref!r}")

    def to_gbnf(self) -> str:
        """Render as llama.cpp GBNF text, root first."""
        order = [self.root, *(name for name in self.rules if name != self.root)]
        return "".join(f"{name} ::= {self._gbnf(self.rules[name], top=True)}\n" for name in order)

    def _gbnf(self, node: Node, *, top: bool = False) -> str:
        if isinstance(node, Lit):
            return _gbnf_literal(node.text)
        if isinstance(node, Chars):
            body = "".join(
                _gbnf_char(low) if low == high else f"{_gbnf_char(low)}-{_gbnf_char(high)}" for low, high in node.ranges
            )
            return f"[{'^' if node.negated else ''}{body}]"
        if isinstance(node, Ref):
            return node.name
        if isinstance(node, Seq):
            text = " ".join(self._gbnf(item) for item in node.items)
            return text if top else f"({text})"
        if isinstance(node, Alt):
            text = " | ".join(self._gbnf(option, top=True) for option in node.options)
            return text if top else f"({text})"
        return f"{self._gbnf(node.item)}{_quantifier(node.low, node.high)}"

    def to_regex(self, rule: str | None = None) -> str:
        """Render one rule (default: root) as a regular expression, references inlined; recursion is an error.

        Plain groups only (no ``(?:``): the pattern must also pass through
        llama.cpp's JSON-schema converter, which knows no other kind.
        """
        return self._regex(Ref(rule or self.root), ())

    def _regex(self, node: Node, active: tuple[str, ...]) -> str:
        if isinstance(node, Lit):
            return "".join(_regex_char(char) for char in node.text)
        if isinstance(node, Chars):
            body = "".join(
                _regex_char(low, in_class=True)
                if low == high
                else f"{_regex_char(low, in_class=True)}-{_regex_char(high, in_class=True)}"
                for low, high in node.ranges
            )
            return f"[{'^' if node.negated else ''}{body}]"
        if isinstance(node, Ref):
            if node.name in active:
                raise GrammarError(f"rule {node.name!r} is recursive; no regular expression can express it")
            return self._regex(self.rules[node.name], (*active, node.name))
        if isinstance(node, Seq):
            return "".join(
                f"({self._regex(item, active)})" if self._is_alt(item) else self._regex(item, active)
                for item in node.items
            )
        if isinstance(node, Alt):
            return "|".join(self._regex(option, active) for option in node.options)
        item = self._regex(node.item, active)
        single = isinstance(node.item, Chars) or (isinstance(node.item, Lit) and len(node.item.text) == 1)
        return f"{item if single else f'({item})'}{_quantifier(node.low, node.high)}"

    def _is_alt(self, node: Node) -> bool:
        """Whether a node renders as a top-level alternation (and so needs a group inside a sequence)."""
        while isinstance(node, Ref):
            node = self.rules[node.name]
        return isinstance(node, Alt)

    def max_bytes(self, rule: str | None = None) -> int | None:
        """UTF-8 length of the longest string the rule accepts; None if unbounded (recursion, open repeats).

        What bounds the tokens a sampler needs to finish it (a token is at least one byte).
        """
        return self._max(Ref(rule or self.root), (), in_bytes=True)

    def max_chars(self, rule: str | None = None) -> int | None:
        """Length in characters of the longest string the rule accepts (what services and JSON schemas count)."""
        return self._max(Ref(rule or self.root), (), in_bytes=False)

    def _max(self, node: Node, active: tuple[str, ...], *, in_bytes: bool) -> int | None:
        if isinstance(node, Lit):
            return len(node.text.encode()) if in_bytes else len(node.text)
        if isinstance(node, Chars):
            if not in_bytes:
                return 1
            return 4 if node.negated else max(len(high.encode()) for _, high in node.ranges)
        if isinstance(node, Ref):
            if node.name in active:
                return None
            return self._max(self.rules[node.name], (*active, node.name), in_bytes=in_bytes)
        if isinstance(node, Seq | Alt):
            items = node.items if isinstance(node, Seq) else node.options
            parts = [self._max(item, active, in_bytes=in_bytes) for item in items]
            known = [part for part in parts if part is not None]
            if len(known) < len(parts):
                return None
            return sum(known) if isinstance(node, Seq) else max(known)
        item = self._max(node.item, active, in_bytes=in_bytes)
        return None if node.high is None or item is None else item * node.high


def _quantifier(low: int, high: int | None) -> str:
    if (low, high) == (0, 1):
        return "?"
    if (low, high) == (0, None):
        return "*"
    if (low, high) == (1, None):
        return "+"
    if high is None:
        return f"{{{low},}}"
    return f"{{{low}}}" if low == high else f"{{{low},{high}}}"


def _refs(node: Node) -> Iterable[str]:
    if isinstance(node, Ref):
        yield node.name
    elif isinstance(node, Seq):
        for item in node.items:
            yield from _refs(item)
    elif isinstance(node, Alt):
        for option in node.options:
            yield from _refs(option)
    elif isinstance(node, Repeat):
        yield from _refs(node.item)
