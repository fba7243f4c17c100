"""Tool-argument constraints, proved with llama.cpp's own grammar parser and matcher.

Every grammar is parsed by ``llama_sampler_init_grammar`` and every example
string is matched token by token through llama.cpp's grammar sampler over the
embedded model's vocabulary (tests/support/llama_grammar.py). Known-good arguments are
also run through the services' own acceptance logic (tests/support/tool_arguments.py),
so "the grammar accepts it" and "the service accepts it" are checked together.
The last test samples the real model under each grammar (marker ``llm``).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import Message
from heist.file_reader.v1 import file_reader_pb2
from heist.tools.v1 import options_pb2 as tool_options

from heist_common.tools.argument_grammars import (
    ARGUMENT_RULE,
    ARITHMETIC_SHAPES,
    ColumnInfo,
    ConstraintCache,
    ConstraintError,
    Listing,
    NoValidArgument,
    TableInfo,
    ToolConstraint,
    argument_hint,
    build_constraint,
    listing_from_response,
    names_grammar,
)
from heist_common.tools.gbnf import Alt, Chars, Grammar, Lit, Node, Ref, Repeat, Seq
from heist_common.tools.registry import ToolRegistry
from servers.file_reader import DEFAULT_DOCUMENTS_DIR
from tests.support.llama_grammar import GrammarSyntaxError, LlamaGrammarChecker
from tests.support.tool_arguments import TOOLS, ServiceLogic, generate, transcript_prompt

REGISTRY = ToolRegistry.for_services(TOOLS)


@pytest.fixture(scope="module")
def checker() -> Iterator[LlamaGrammarChecker]:
    chk = LlamaGrammarChecker()
    yield chk
    chk.close()


@pytest.fixture(scope="module")
def logic(tmp_path_factory: pytest.TempPathFactory) -> ServiceLogic:
    return ServiceLogic(tmp_path_factory.mktemp("services"))


def inline(tool: str, logic: ServiceLogic, **kwargs: int) -> ToolConstraint:
    method = REGISTRY.service(tool).inline_method
    assert method is not None
    return build_constraint(tool, method.method, logic.listing(tool), **kwargs)


def regex_accepts(constraint: ToolConstraint, text: str) -> bool:
    """The JSON-schema side of the same constraint, on the argument alone (no space, no ``]``)."""
    argument = text.removeprefix(" ").removesuffix("]") if text.endswith("]") else None
    field = next(iter(constraint.json_schema["properties"].values()))
    if argument is None:
        return False
    if "enum" in field:
        return argument in field["enum"]
    return re.fullmatch(field["pattern"], argument) is not None


GOOD = {
    "calculator": [
        "((120 - 35) * (7 + 2))]",
        "(150 - 24) / (37 + 6)]",
        " 2**10]",
        "-3.5 * -(2 - 0.25) // 4 % 3]",
        "1670 - 45]",
    ],
    "file_reader": ["security_system.md]", " bank_layout.md]", "vault_time_lock.md]"],
    "database_query": [
        # The example names a column `shift`; guards has shift_start/shift_end (database_query/bank_fixture.py).
        "SELECT name, shift_start FROM guards WHERE shift_start = '22:00' LIMIT 5]",
        "SELECT * FROM cameras WHERE sweep_seconds > 0 ORDER BY sweep_seconds DESC]",
        "SELECT day_of_week, post FROM shifts WHERE guard_id = 2 AND post LIKE 'interior%']",
        "SELECT COUNT(*) FROM employees WHERE access_level_id >= 5]",
        " SELECT name, door_model, time_lock_open FROM vaults ORDER BY level]",
    ],
}
BAD = {
    "calculator": [
        "((120 - 35) * (7 + / // % **)]",  # operators without operands
        "((120 - 35) * (7 + 2)]",  # unbalanced
        "007 + 1]",  # Python rejects leading zeros
        "alarm:(150 - 24)]",  # words
        "2 ^ 3]",  # not Python's power
        "1 + 2",  # the marker is never closed
        "1 + 2 + 3 + 4 + 5]",  # more terms at one level than the bounded shape allows
        "12345678 * 2]",  # more digits than the bounded shape allows
    ],
    "file_reader": [
        "passwords.txt]",
        "../config/heist.yaml]",
        "security_system.md",  # not closed
        "security_system.md.bak]",
        "SECURITY_SYSTEM.MD]",
    ],
    "database_query": [
        "SELECT name, post_date FROM guards]",  # no such column
        "SELECT name, shift FROM guards WHERE shift = 'night' LIMIT 5]",  # the example: no column `shift`
        "SELECT day_of_week FROM guards]",  # a column of shifts, not of guards
        "DELETE FROM guards]",
        "SELECT name FROM guards; DROP TABLE guards]",
        "SELECT name FROM guards WHERE armed = 'yes']",  # a text literal for an INTEGER column
        "SELECT name FROM guards WHERE name = 'x]' ]",  # a ] inside a literal would end the marker
        "SELECT name FROM prisoners]",
        "select name from guards]",
    ],
}


@pytest.mark.parametrize("tool", TOOLS)
def test_every_grammar_parses_in_llama_cpp(tool: str, checker: LlamaGrammarChecker, logic: ServiceLogic) -> None:
    constraint = inline(tool, logic)
    assert constraint.form == "inline"
    checker.parses(constraint.gbnf)
    # Without a listing (service down) the fallback grammar must parse too.
    method = REGISTRY.service(tool).inline_method
    assert method is not None
    checker.parses(build_constraint(tool, method.method).gbnf)


def test_a_grammar_syntax_error_is_reported_by_llama_cpp(checker: LlamaGrammarChecker) -> None:
    with pytest.raises(GrammarSyntaxError, match="Undefined rule identifier 'expr'"):
        checker.parses('root ::= "(" expr ")"')
    with pytest.raises(GrammarSyntaxError):
        checker.parses("root ::= [0-9")
    with pytest.raises(GrammarSyntaxError, match="left recursion"):
        checker.parses('root ::= root "a" | "b"')


@pytest.mark.parametrize("tool", TOOLS)
def test_grammar_accepts_known_good_arguments(tool: str, checker: LlamaGrammarChecker, logic: ServiceLogic) -> None:
    constraint = inline(tool, logic)
    for text in GOOD[tool]:
        assert checker.accepts(constraint.gbnf, text), f"llama.cpp refused {text!r}"
        assert regex_accepts(constraint, text), f"the JSON-schema pattern refused {text!r}"
        argument = text.strip().removesuffix("]")
        assert logic.refusal(tool, argument) is None, f"the service refuses {argument!r}"


@pytest.mark.parametrize("tool", TOOLS)
def test_grammar_rejects_known_bad_arguments(tool: str, checker: LlamaGrammarChecker, logic: ServiceLogic) -> None:
    constraint = inline(tool, logic)
    for text in BAD[tool]:
        assert not checker.accepts(constraint.gbnf, text), f"llama.cpp accepted {text!r}"
        assert not regex_accepts(constraint, text), f"the JSON-schema pattern accepted {text!r}"


def test_bad_examples_are_bad_for_the_services_too(logic: ServiceLogic) -> None:
    """The rejected examples are not merely outside a narrow grammar: the services refuse them (bar bounds/typing)."""
    assert logic.refusal("calculator", "((120 - 35) * (7 + / // % **)") is not None
    assert logic.refusal("calculator", "007 + 1") is not None
    assert logic.refusal("file_reader", "passwords.txt") is not None
    assert "no such column: post_date" in (logic.refusal("database_query", "SELECT name, post_date FROM guards") or "")
    assert "no such column: shift" in (logic.refusal("database_query", "SELECT name, shift FROM guards") or "")
    assert logic.refusal("database_query", "DELETE FROM guards") is not None


def _longest(grammar: Grammar, node: Node) -> str:
    """The longest string a non-recursive grammar accepts (what ``max_bytes`` claims), ASCII-only classes."""
    if isinstance(node, Lit):
        return node.text
    if isinstance(node, Chars):
        assert not node.negated
        return max(high for _, high in node.ranges)
    if isinstance(node, Ref):
        return _longest(grammar, grammar.rules[node.name])
    if isinstance(node, Seq):
        return "".join(_longest(grammar, item) for item in node.items)
    if isinstance(node, Alt):
        return max((_longest(grammar, option) for option in node.options), key=len)
    assert isinstance(node, Repeat) and node.high is not None
    return _longest(grammar, node.item) * node.high


@pytest.mark.parametrize("max_bytes", [None, 120, 60, 14])
def test_arithmetic_length_bound_is_tight_and_accepted(checker: LlamaGrammarChecker, max_bytes: int | None) -> None:
    method = REGISTRY.service("calculator").inline_method
    assert method is not None
    constraint = build_constraint("calculator", method.method, max_bytes=max_bytes)
    contract = argument_hint(method.method)
    assert contract is not None and contract.max_length == 500
    assert constraint.max_bytes is not None and constraint.max_bytes <= (max_bytes or 502)
    assert constraint.json_schema["properties"]["expression"]["maxLength"] == constraint.max_bytes - 2 <= 500
    # The bound is attained: the longest continuation is accepted by llama.cpp and is exactly max_bytes long.
    from heist_common.tools.argument_grammars import arithmetic_grammar

    grammar = arithmetic_grammar(500, max_bytes=None if max_bytes is None else max_bytes - 2)
    longest = _longest(grammar, Ref(ARGUMENT_RULE))
    assert len(f" {longest}]") == constraint.max_bytes
    assert checker.accepts(constraint.gbnf, f" {longest}]")
    assert not checker.accepts(constraint.gbnf, f" {longest}0]")


def test_grammar_algebra_refuses_what_it_cannot_render(checker: LlamaGrammarChecker) -> None:
    from heist_common.tools.gbnf import GrammarError

    with pytest.raises(GrammarError, match="undefined rule 'nope'"):
        Grammar({"root": Ref("nope")})
    recursive = Grammar({"root": Alt((Lit("x"), Seq((Lit("("), Ref("root"), Lit(")")))))})
    checker.parses(recursive.to_gbnf())  # fine for llama.cpp ...
    assert checker.accepts(recursive.to_gbnf(), "((x))")
    assert recursive.max_bytes() is None  # ... but unbounded
    with pytest.raises(GrammarError, match="recursive"):
        recursive.to_regex()  # ... and no regular expression


def test_arithmetic_shapes_are_ordered_richest_first() -> None:
    from heist_common.tools.argument_grammars import _arithmetic

    sizes = [_arithmetic(shape).max_bytes(ARGUMENT_RULE) or 0 for shape in ARITHMETIC_SHAPES]
    assert sizes == sorted(sizes, reverse=True)


def test_sql_columns_belong_to_the_chosen_table(checker: LlamaGrammarChecker, logic: ServiceLogic) -> None:
    constraint = inline("database_query", logic)
    listing = logic.listing("database_query")
    assert listing is not None
    for table in listing.tables:
        own = {c.name for c in table.columns}
        foreign = sorted({c.name for t in listing.tables for c in t.columns} - own)
        for column in sorted(own):
            assert checker.accepts(constraint.gbnf, f"SELECT {column} FROM {table.name}]")
        for column in foreign:
            assert not checker.accepts(constraint.gbnf, f"SELECT {column} FROM {table.name}]"), (column, table.name)
            assert logic.refusal("database_query", f"SELECT {column} FROM {table.name}") is not None


def test_sql_json_schema_and_file_enum(logic: ServiceLogic) -> None:
    sql = inline("database_query", logic).json_schema["properties"]["sql"]
    assert sql["type"] == "string" and sql["pattern"].startswith("^(SELECT ")
    assert sql["maxLength"] <= 4000
    assert sql["description"].startswith("One SQL SELECT statement")
    files = inline("file_reader", logic).json_schema
    assert files["properties"]["filename"]["enum"] == sorted(p.name for p in DEFAULT_DOCUMENTS_DIR.glob("*.md"))
    assert files["required"] == ["filename"] and files["additionalProperties"] is False


@pytest.mark.parametrize("tool", TOOLS)
def test_json_schema_through_llama_cpps_converter(tool: str, checker: LlamaGrammarChecker, logic: ServiceLogic) -> None:
    """The constrained request schema, converted by llama.cpp's own JSON-schema converter, constrains JSON arguments."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    constraint = inline(tool, logic)
    gbnf = json_schema_to_gbnf(json.dumps(constraint.json_schema))
    checker.parses(gbnf)
    field = next(iter(constraint.json_schema["properties"]))
    good = GOOD[tool][0].strip().removesuffix("]")
    bad = BAD[tool][0].strip().removesuffix("]")
    assert checker.accepts(gbnf, json.dumps({field: good}))
    assert not checker.accepts(gbnf, json.dumps({field: bad}))


def test_methods_that_cannot_be_called_inline_get_a_json_grammar(checker: LlamaGrammarChecker) -> None:
    list_files = REGISTRY.service("file_reader").descriptor.methods_by_name["ListFiles"]
    constraint = build_constraint("file_reader", list_files)
    assert constraint.form == "json" and constraint.kind == "UNSPECIFIED"
    checker.parses(constraint.gbnf)
    assert checker.accepts(constraint.gbnf, "{}")
    assert not checker.accepts(constraint.gbnf, '{"filename": "x"}')


def test_without_a_listing_the_argument_is_any_one_line_text(checker: LlamaGrammarChecker) -> None:
    method = REGISTRY.service("file_reader").inline_method
    assert method is not None
    constraint = build_constraint("file_reader", method.method)
    assert constraint.listing_fingerprint is None and constraint.max_bytes == 255 * 4 + 2  # UTF-8 bytes
    assert constraint.json_schema["properties"]["filename"]["maxLength"] == 255  # characters
    assert checker.accepts(constraint.gbnf, "passwords.txt]")
    assert checker.accepts(constraint.gbnf, "dossier_été.md]")
    assert not checker.accepts(constraint.gbnf, "a]b]")
    assert not checker.accepts(constraint.gbnf, "a\nb]")
    assert not checker.accepts(constraint.gbnf, "x" * 256 + "]")
    # Under a token budget: printable ASCII, one byte each, so the whole continuation fits the budget.
    tight = build_constraint("file_reader", method.method, max_bytes=40)
    assert tight.max_bytes == 40
    assert checker.accepts(tight.gbnf, " " + "x" * 38 + "]")
    assert not checker.accepts(tight.gbnf, " " + "x" * 39 + "]")
    assert not checker.accepts(tight.gbnf, "dossier_été.md]")


def test_names_unusable_inline_are_left_out_and_an_empty_listing_names_nothing(checker: LlamaGrammarChecker) -> None:
    grammar = names_grammar(["ok.md", "odd]name.md", " padded.md", 'quote"and\\slash.md', "ünïcode.md"])
    rules = Grammar({**grammar.rules, "root": Seq((Ref(ARGUMENT_RULE), Lit("]")))})
    gbnf = rules.to_gbnf()
    assert checker.accepts(gbnf, "ok.md]")
    assert checker.accepts(gbnf, 'quote"and\\slash.md]')
    assert checker.accepts(gbnf, "ünïcode.md]")
    assert not checker.accepts(gbnf, "odd]")
    with pytest.raises(NoValidArgument):
        names_grammar([])
    with pytest.raises(NoValidArgument):
        names_grammar(["only]bad"])


def test_sql_identifiers_that_need_quoting(checker: LlamaGrammarChecker) -> None:
    method = REGISTRY.service("database_query").inline_method
    assert method is not None
    listing = Listing(tables=(TableInfo("order", (ColumnInfo("group", "TEXT"), ColumnInfo("total amount", "REAL"))),))
    gbnf = build_constraint("database_query", method.method, listing).gbnf
    assert checker.accepts(gbnf, 'SELECT "group", "total amount" FROM "order" WHERE "total amount" > 9.5]')
    assert not checker.accepts(gbnf, "SELECT group FROM order]")


def test_listing_read_from_the_services_responses(logic: ServiceLogic) -> None:
    tables = logic.listing("database_query")
    assert tables is not None
    guards = next(t for t in tables.tables if t.name == "guards")
    assert [c.name for c in guards.columns][:4] == ["id", "name", "badge_number", "post"]
    assert guards.columns[1].literal_kinds == (False, True) and guards.columns[0].literal_kinds == (True, False)
    files = listing_from_response(
        tool_options.ARGUMENT_KIND_ONE_OF_LISTING,
        file_reader_pb2.ListFilesResponse(files=[file_reader_pb2.FileInfo(name="a.md", size_bytes=3)]),
    )
    assert files.names == ("a.md",)
    with pytest.raises(ConstraintError):
        listing_from_response(tool_options.ARGUMENT_KIND_SQL_SELECT_OVER_TABLES, file_reader_pb2.ListFilesResponse())


def test_fingerprint_tracks_what_the_grammar_depends_on() -> None:
    a = Listing(tables=(TableInfo("t", (ColumnInfo("x", "TEXT"),)),))
    same = Listing(tables=(TableInfo("t", (ColumnInfo("x", "TEXT"),)),))
    retyped = Listing(tables=(TableInfo("t", (ColumnInfo("x", "INTEGER"),)),))
    assert a.fingerprint() == same.fingerprint() != retyped.fingerprint()
    assert Listing(names=("a", "b")).fingerprint() == Listing(names=("b", "a")).fingerprint()
    assert Listing(names=("a",)).fingerprint() != Listing(names=("a", "b")).fingerprint()


def _contract(listing_method: str, request_fields: int = 0) -> descriptor_pool.DescriptorPool:
    """A tool contract whose argument names ``listing_method`` (which may not exist)."""
    pool = descriptor_pool.DescriptorPool()
    for module in (descriptor_pb2, tool_options):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        pool.Add(proto)
    fdp = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="t.proto", package="t", syntax="proto3", dependency=["heist/tools/v1/options.proto"]
    )
    request = file.message_type.add(name="Req")
    field = request.field.add(name="name", number=1, type=fdp.TYPE_STRING, label=fdp.LABEL_OPTIONAL)
    option = field.options.Extensions[tool_options.argument_constraint]
    option.kind = tool_options.ARGUMENT_KIND_ONE_OF_LISTING
    option.listing_method = listing_method
    listing_request = file.message_type.add(name="ListReq")
    for number in range(1, request_fields + 1):
        listing_request.field.add(name=f"f{number}", number=number, type=fdp.TYPE_INT32, label=fdp.LABEL_OPTIONAL)
    file.message_type.add(name="Resp")
    service = file.service.add(name="Svc")
    service.method.add(name="Read", input_type=".t.Req", output_type=".t.Resp")
    service.method.add(name="List", input_type=".t.ListReq", output_type=".t.Resp")
    pool.Add(file)
    return pool


def test_contract_mistakes_are_reported() -> None:
    good = _contract("List").FindServiceByName("t.Svc").methods_by_name["Read"]
    hint = argument_hint(good)
    assert hint is not None and hint.listing_method is not None and hint.listing_method.name == "List"
    with pytest.raises(ConstraintError, match=r"'Lists' is not a method of t\.Svc"):
        argument_hint(_contract("Lists").FindServiceByName("t.Svc").methods_by_name["Read"])
    with pytest.raises(ConstraintError, match="must take an empty request"):
        argument_hint(_contract("List", request_fields=1).FindServiceByName("t.Svc").methods_by_name["Read"])


def test_every_inline_tool_argument_carries_a_hint() -> None:
    kinds = {}
    for tool in TOOLS:
        method = REGISTRY.service(tool).inline_method
        assert method is not None
        hint = argument_hint(method.method)
        assert hint is not None
        kinds[tool] = (hint.kind_name, hint.listing_method.name if hint.listing_method else None, hint.max_length)
    assert kinds == {
        "calculator": ("ARITHMETIC_EXPRESSION", None, 500),
        "file_reader": ("ONE_OF_LISTING", "ListFiles", 255),
        "database_query": ("SQL_SELECT_OVER_TABLES", "ListTables", 4000),
    }


# ---------------------------------------------------------------------------
# The session cache, fed by the real servicers' listings.


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Fetcher:
    """Answers listing calls through the real servicers (of a folder and a bank database the test changes)."""

    def __init__(self, logic: ServiceLogic) -> None:
        self.logic = logic
        self.calls: list[str] = []
        self.fail = False

    async def __call__(self, tool: str, method: object) -> Message:
        name = getattr(method, "name", "")
        self.calls.append(f"{tool}.{name}")
        if self.fail:
            raise ConnectionError("service down")
        return await (self.logic.list_files() if tool == "file_reader" else self.logic.list_tables())


def test_cache_rebuilds_only_when_the_listing_changes(tmp_path: Path, checker: LlamaGrammarChecker) -> None:
    documents = tmp_path / "documents"
    shutil.copytree(DEFAULT_DOCUMENTS_DIR, documents)
    fetch = Fetcher(ServiceLogic(tmp_path / "data", documents_dir=documents))
    clock = Clock()
    cache = ConstraintCache(REGISTRY, max_age_s=30.0, clock=clock)

    async def scenario() -> None:
        first = await cache.inline("file_reader", fetch)
        assert first is not None and not checker.accepts(first.gbnf, "escape_routes.md]")
        assert await cache.inline("file_reader", fetch) is first and len(fetch.calls) == 1  # fresh: no fetch

        clock.now = 31.0  # stale, listing unchanged: fetched again, not rebuilt
        (documents / "bank_layout.md").write_text("changed text, same name")
        assert await cache.inline("file_reader", fetch) is first
        assert len(fetch.calls) == 2 and cache.stats.builds == 1

        (documents / "escape_routes.md").write_text("# Escape routes\n")  # a new document
        assert await cache.inline("file_reader", fetch) is first  # still within max_age
        cache.invalidate("file_reader")  # e.g. after a NOT_FOUND
        second = await cache.inline("file_reader", fetch)
        assert second is not None and second is not first and cache.stats.builds == 2
        assert second.listing_fingerprint != first.listing_fingerprint
        assert checker.accepts(second.gbnf, "escape_routes.md]")

        fetch.fail = True  # a failed fetch keeps the last good constraint
        clock.now = 100.0
        assert await cache.inline("file_reader", fetch) is second
        assert "ConnectionError" in cache.stats.fetch_errors["file_reader"]

        for path in documents.iterdir():  # nothing left to read: no constraint (do not prefill a marker)
            path.unlink()
        fetch.fail = False
        clock.now = 200.0
        assert await cache.inline("file_reader", fetch) is None

    asyncio.run(scenario())


def test_cache_sees_a_rebuilt_bank_database(tmp_path: Path) -> None:
    import sqlite3

    from servers.database_query.bank_fixture import build

    own = ServiceLogic(tmp_path)  # its own bank.db, rebuilt and altered below
    bank = own.bank_path
    fetch = Fetcher(own)
    cache = ConstraintCache(REGISTRY, max_age_s=0.0)

    async def scenario() -> None:
        first = await cache.inline("database_query", fetch)
        build(bank)  # rebuilt, same schema: same fingerprint, no rebuild
        assert await cache.inline("database_query", fetch) is first and cache.stats.builds == 1
        with sqlite3.connect(bank) as db:
            db.execute("ALTER TABLE guards ADD COLUMN radio_channel INTEGER NOT NULL DEFAULT 3")
        second = await cache.inline("database_query", fetch)
        assert second is not None and second is not first and cache.stats.builds == 2
        assert "radio_channel" in second.gbnf and "radio_channel" not in (first.gbnf if first else "")

    asyncio.run(scenario())


def test_cache_without_a_fetcher_and_for_static_tools() -> None:
    cache = ConstraintCache(REGISTRY)

    async def scenario() -> None:
        calc = await cache.inline("calculator", None)
        assert calc is not None and calc.kind == "ARITHMETIC_EXPRESSION"
        cache.invalidate()
        assert await cache.inline("calculator", None) is calc  # nothing at run time changes it
        fallback = await cache.inline("file_reader", None)
        assert fallback is not None and fallback.listing_fingerprint is None
        assert cache.stats.builds == 2 and cache.stats.fetches == 0

    asyncio.run(scenario())


def test_a_token_budget_too_small_for_any_argument(logic: ServiceLogic) -> None:
    method = REGISTRY.service("database_query").inline_method
    assert method is not None
    with pytest.raises(ConstraintError, match="no SELECT over these tables fits in 4000 characters and 8 bytes"):
        build_constraint("database_query", method.method, logic.listing("database_query"), max_bytes=10)
    cache = ConstraintCache(REGISTRY, max_bytes=3)

    async def scenario() -> None:
        assert await cache.inline("calculator", None) is None  # unconstrained, and why is on record
        assert "no arithmetic expression fits" in cache.stats.build_errors["calculator"]

    asyncio.run(scenario())


# ---------------------------------------------------------------------------
# The real model, sampling under each grammar.

SEEDS = (1, 2, 3)


def _acceptable(tool: str, refusal: str | None) -> bool:
    """Accepted, or refused for what no grammar of the argument's shape can know (calculator values)."""
    return refusal is None or (
        tool == "calculator" and any(reason in refusal for reason in ("division by zero", "too large", "digits"))
    )


@pytest.mark.llm
@pytest.mark.timeout(900)
def test_the_embedded_model_under_each_grammar_writes_arguments_the_services_accept(logic: ServiceLogic) -> None:
    """Gemma 3 270M, prefilled with ``[TOOL:<tool>:``, sampled at temperature 0.7 under the grammar.

    Two ways to size a turn, both of which must always finish the marker:
    the grammar tightened to a 40-token turn (``max_bytes=40``: a space, the
    argument and ``]`` fit in 40 tokens of at least one byte each), and the
    contract-bound grammar with ``max_tokens = max_bytes``. Each argument is
    judged by the services' own logic (tests/support/tool_arguments.py).
    """
    import llama_cpp

    from tests.support.llama_grammar import ensure_model

    llm = llama_cpp.Llama(str(ensure_model()), n_ctx=1024, n_threads=2, n_batch=256, verbose=False, seed=0)
    try:
        for tool in TOOLS:
            prompt, prefill = transcript_prompt(tool, REGISTRY)
            tight = inline(tool, logic, max_bytes=40)
            contract = inline(tool, logic)
            assert tight.max_bytes is not None and tight.max_bytes <= 40
            assert contract.max_bytes is not None
            for constraint, max_tokens in ((tight, 40), (contract, contract.max_bytes)):
                grammar = llama_cpp.LlamaGrammar.from_string(constraint.gbnf, verbose=False)
                for seed in SEEDS:
                    sample = generate(llm, tool, prompt, prefill, seed, logic, grammar=grammar, max_tokens=max_tokens)
                    assert not sample.truncated and sample.continuation.endswith("]"), sample
                    assert _acceptable(tool, sample.refusal), sample
    finally:
        llm.close()
