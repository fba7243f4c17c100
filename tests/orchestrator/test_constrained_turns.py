"""llm.constrained_tools in running turns: what reaches the model server, and the fallback when it refuses.

The scripted endpoint records every request body, so these tests see the
``grammar`` field and the strict tool definitions as the server would. Tool
names, file names and columns come from the services' own listings (the
grammar is built from them); the tests only check that they arrived.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from heist_common.config import HeistConfig
from heist_common.tools.argument_grammars import ConstraintError, Listing, build_constraint
from heist_common.tools.registry import ToolRegistry
from orchestrator.session.runner import RunOptions, run_session
from orchestrator.turn import constrained_tools
from orchestrator.turn.constrained_tools import FALLBACK_OPERATION, reply_grammar, strict_schema
from tests.support.inprocess import InProcessMesh, audit_rows
from tests.support.llama_grammar import LlamaGrammarChecker
from tests.support.scripted_llm import Reply, ScriptedLLM, http_error, text, tool_call

DOCUMENTS = ("bank_layout.md", "guard_rotation_notes.md", "security_system.md", "vault_time_lock.md")
"""servers/data/documents, which ListFiles reports (the hacker's grammar must name exactly these)."""


def configured(config: HeistConfig, **llm: Any) -> HeistConfig:
    return config.with_overrides(llm=config.llm.model_copy(update=llm))


def tool_rows(config: HeistConfig, session_id: str) -> list[tuple[Any, ...]]:
    return audit_rows(
        config,
        "SELECT agent_name, tool_name, success, status_code FROM tool_usage WHERE session_id = ? ORDER BY id",
        session_id,
    )


def fallback_rows(config: HeistConfig, session_id: str) -> list[tuple[Any, ...]]:
    return audit_rows(
        config,
        "SELECT service, status_code, detail, turn_id FROM events WHERE session_id = ? AND operation = ?",
        session_id,
        FALLBACK_OPERATION,
    )


async def test_a_prefilled_marker_gets_its_argument_under_the_grammar_then_the_line_goes_on(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script(
        text("Let's plan."),  # planner: no tools, no grammar
        text("bank_layout.md]"),  # hacker: the argument, under the grammar
        text("The layout says Harbor Street."),  # ... then the rest of the line, free
        text("(2 + 3) * 4]"),  # safecracker
        text(""),  # ... who then says nothing more
        text("SELECT * FROM guards LIMIT 1]"),  # mole
        text("That is the night guard."),
    )
    config = configured(mesh.config, prompt_style="transcript", prefill_tool_every=2, constrained_tools="auto")
    result = await run_session(config, RunOptions(turns=4))

    assert result.status == "completed"
    bodies = scripted_llm.text_requests
    assert len(bodies) == 7
    grammars = [body.get("grammar") for body in bodies]
    assert [grammar is not None for grammar in grammars] == [False, True, False, True, False, True, False]
    # The hacker's grammar is the ListFiles enumeration; the mole's names the real tables.
    assert all(json.dumps(name) in grammars[1] for name in DOCUMENTS)
    assert "guards" in grammars[5] and "SELECT " in grammars[5]
    assert bodies[1]["prompt"].endswith("Hacker: [TOOL:file_reader:")
    assert bodies[1]["max_tokens"] >= config.llm.max_tokens
    assert bodies[2]["prompt"].endswith("Hacker: [TOOL:file_reader:bank_layout.md]")
    assert "Harbor Street" in result.turns[1].message and "The layout says Harbor Street." in result.turns[1].message
    assert "(2 + 3) * 4 = 20" in result.turns[2].message
    assert tool_rows(config, result.session_id) == [
        ("hacker", "file_reader", 1, "OK"),
        ("safecracker", "calculator", 1, "OK"),
        ("mole", "database_query", 1, "OK"),
    ]
    # Every request is a step of its turn's timeline (two for each tool turn, plus the listing RPCs).
    timings = audit_rows(
        config, "SELECT turn_id, timings FROM messages WHERE session_id = ? ORDER BY turn_id", result.session_id
    )
    llm_steps = [sum(step[0] == "llm" for step in json.loads(raw)["steps"]) for _, raw in timings]
    assert llm_steps == [1, 2, 2, 2]
    assert not fallback_rows(config, result.session_id)


async def test_a_marker_the_model_opens_is_regenerated_under_the_grammar_unless_already_valid(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script(
        text("Let's plan."),
        text("I will read [TOOL:file_reader:bank_layout.md] first."),  # valid already: kept, no grammar request
        text("Let me work it out: [TOOL:calculator: ((120 - 35) * (7 + / // % **)] done."),  # malformed
        text("(120 - 35) * 7]"),  # the argument again, under the grammar
        text("That is the code."),  # the rest of the line
    )
    config = configured(mesh.config, prompt_style="transcript", prefill_tool_every=0, constrained_tools="grammar")
    result = await run_session(config, RunOptions(turns=3))

    bodies = scripted_llm.text_requests
    assert [("grammar" in body) for body in bodies] == [False, False, False, True, False]
    assert bodies[3]["prompt"].endswith("Safecracker: Let me work it out: [TOOL:calculator:")
    assert "((120 - 35) * 7" not in bodies[3]["grammar"]  # a grammar, not the answer
    assert "bank_layout.md" in result.turns[1].message and result.turns[1].message.endswith("first.")
    assert "(120 - 35) * 7 = 595" in result.turns[2].message
    assert result.turns[2].message.endswith("That is the code.") and "**" not in result.turns[2].message
    assert [row[2] for row in tool_rows(config, result.session_id)] == [1, 1]


async def test_constrained_tools_off_sends_no_grammar(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script(text("Plan."), text("Reading [TOOL:file_reader:nope.md] now."))
    config = configured(mesh.config, prompt_style="transcript", prefill_tool_every=0, constrained_tools="off")
    result = await run_session(config, RunOptions(turns=2))

    assert len(scripted_llm.text_requests) == 2
    assert not any("grammar" in body for body in scripted_llm.text_requests)
    assert tool_rows(config, result.session_id) == [("hacker", "file_reader", 0, "NOT_FOUND")]


def rejecting(field: str, status: int = 400) -> Any:
    """A server that refuses any request carrying ``field`` (as OpenAI does), and otherwise writes valid arguments."""

    def respond(body: dict[str, Any]) -> Reply:
        if field in body or any(field in tool.get("function", {}) for tool in body.get("tools", ())):
            return http_error(status, f"Unrecognized request argument supplied: {field}")
        prompt = str(body.get("prompt", ""))
        if prompt.endswith("[TOOL:file_reader:"):
            return text("vault_time_lock.md] Got it.")
        if prompt.endswith("[TOOL:calculator:"):
            return text("6 * 7] Easy.")
        if prompt.endswith("[TOOL:database_query:"):
            return text("SELECT COUNT(*) FROM guards] Counted.")
        return text("Fine by me.")

    return respond


@pytest.mark.parametrize("status", [400, 422])
async def test_a_server_that_rejects_grammar_falls_back_once_and_the_run_completes(
    mesh: InProcessMesh, status: int
) -> None:
    with ScriptedLLM(responder=rejecting("grammar", status)) as llm:
        config = configured(
            mesh.config, base_url=llm.base_url, prompt_style="transcript", prefill_tool_every=1,
            constrained_tools="auto",
        )  # fmt: skip
        result = await run_session(config, RunOptions(turns=8))
        bodies = llm.text_requests

    assert result.status == "completed"
    assert all(turn.status == "ok" for turn in result.turns)
    with_grammar = [index for index, body in enumerate(bodies) if "grammar" in body]
    assert with_grammar == [1]  # the hacker's first argument, then never again
    rows = fallback_rows(config, result.session_id)
    assert len(rows) == 1
    service, code, detail, turn_id = rows[0]
    assert (service, code, turn_id) == ("llm", f"HTTP {status}", 2) and "grammar" in detail
    # The unconstrained requests that followed still made every tool call.
    assert len(tool_rows(config, result.session_id)) == 6


async def test_explicit_grammar_is_not_dropped_when_the_server_rejects_it(mesh: InProcessMesh) -> None:
    with ScriptedLLM(responder=rejecting("grammar")) as llm:
        config = configured(
            mesh.config, base_url=llm.base_url, prompt_style="transcript", prefill_tool_every=1,
            constrained_tools="grammar",
        )  # fmt: skip
        result = await run_session(config, RunOptions(turns=2))

    assert result.turns[1].status == "llm_error" and "grammar" in result.turns[1].message
    assert not fallback_rows(config, result.session_id)


async def test_native_calls_get_strict_schemas_from_the_listings(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM
) -> None:
    scripted_llm.script(
        text("Plan."),
        tool_call("file_reader_read_file", filename="bank_layout.md"),
        text("Harbor Street it is."),
    )
    config = configured(mesh.config, prompt_style="chat", tool_calling="native", constrained_tools="auto")
    result = await run_session(config, RunOptions(turns=2))

    hacker = scripted_llm.chat_requests[1]
    tools = {tool["function"]["name"]: tool["function"] for tool in hacker["tools"]}
    read = tools["file_reader_read_file"]
    assert read["strict"] is True
    assert read["parameters"]["properties"]["filename"]["enum"] == list(DOCUMENTS)
    assert read["parameters"]["required"] == list(read["parameters"]["properties"])
    assert "grammar" not in hacker  # native calls are constrained by their schema alone
    assert scripted_llm.chat_requests[2]["tools"] == hacker["tools"]  # the follow-up round offers the same
    assert tool_rows(config, result.session_id) == [("hacker", "file_reader", 1, "OK")]


async def test_a_server_that_rejects_strict_tools_gets_plain_ones_for_the_rest_of_the_run(mesh: InProcessMesh) -> None:
    with ScriptedLLM(responder=rejecting("strict")) as llm:
        config = configured(
            mesh.config, base_url=llm.base_url, prompt_style="chat", tool_calling="native",
            constrained_tools="auto",
        )  # fmt: skip
        result = await run_session(config, RunOptions(turns=6))
        bodies = llm.chat_requests

    assert result.status == "completed" and all(turn.status == "ok" for turn in result.turns)
    strict = [i for i, body in enumerate(bodies) if any("strict" in t["function"] for t in body.get("tools", ()))]
    assert strict == [1]
    assert len(fallback_rows(config, result.session_id)) == 1


@pytest.mark.parametrize(("filename", "refetched"), [("bank_layout.md", False), ("gone.md", True)])
async def test_a_tool_refusing_a_name_refreshes_that_tools_listing(
    mesh: InProcessMesh, scripted_llm: ScriptedLLM, filename: str, refetched: bool
) -> None:
    scripted_llm.script(
        text("Plan."),
        tool_call("file_reader_read_file", filename=filename),  # NOT_FOUND for a name the listing no longer has
        text("Noted."),
        text("Numbers."),
        text("Tables."),
        text("Plan again."),
        text("Nothing to read."),
    )
    config = configured(mesh.config, prompt_style="chat", tool_calling="native", constrained_tools="json_schema")
    result = await run_session(config, RunOptions(turns=6))

    timings = dict(
        audit_rows(
            config, "SELECT turn_id, timings FROM messages WHERE session_id = ? ORDER BY turn_id", result.session_id
        )
    )
    listed = {
        turn: any(step[1].endswith(".ListFiles") for step in json.loads(raw)["steps"]) for turn, raw in timings.items()
    }
    assert listed[2]  # the first constraint reads the listing
    assert listed[6] is refetched  # cached for 30 s, unless the tool said the name was not there


def test_strict_schema_requires_every_property_and_makes_optional_ones_nullable() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "integer"}, "c": {"type": "array", "items": {
            "type": "object", "properties": {"d": {"type": "string"}}, "required": []}}},
        "required": ["a"],
    }  # fmt: skip
    strict = strict_schema(schema)
    assert strict["required"] == ["a", "b", "c"] and strict["additionalProperties"] is False
    assert strict["properties"]["a"]["type"] == "string"
    assert strict["properties"]["b"]["type"] == ["integer", "null"]
    assert strict["properties"]["c"]["items"]["required"] == ["d"]
    assert schema["required"] == ["a"]  # the input is left alone


async def test_inline_chat_replies_carry_a_whole_reply_grammar(mesh: InProcessMesh, scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script(text("Plan."), text("I will check [TOOL:file_reader:bank_layout.md] first."))
    config = configured(mesh.config, prompt_style="chat", tool_calling="inline", constrained_tools="auto")
    result = await run_session(config, RunOptions(turns=2))

    planner, hacker = scripted_llm.chat_requests
    assert "grammar" not in planner and "tools" not in hacker
    grammar = hacker["grammar"]
    assert '"[TOOL:"' in grammar and '"file_reader:"' in grammar and '"calculator:"' not in grammar
    assert all(json.dumps(name) in grammar for name in DOCUMENTS)
    assert tool_rows(config, result.session_id) == [("hacker", "file_reader", 1, "OK")]


@pytest.fixture(scope="module")
def checker() -> Iterator[LlamaGrammarChecker]:
    chk = LlamaGrammarChecker()
    yield chk
    chk.close()


def test_the_reply_grammar_lets_text_through_and_constrains_markers(checker: LlamaGrammarChecker) -> None:
    registry = ToolRegistry.for_services(["file_reader", "calculator"])
    listings = {"file_reader": Listing(names=DOCUMENTS), "calculator": None}
    constraints = []
    for tool, listing in listings.items():
        method = registry.service(tool).inline_method
        assert method is not None
        constraints.append(build_constraint(tool, method.method, listing, max_bytes=60))
    grammar = reply_grammar(constraints)
    checker.parses(grammar)
    both = "Sure.\nI will read [TOOL:file_reader:bank_layout.md] and add [TOOL:calculator:(2 + 3) * 4]."
    assert checker.accepts(grammar, both)
    assert checker.accepts(grammar, "No tools today.")
    assert not checker.accepts(grammar, "Reading [TOOL:file_reader:nope.md] now.")
    assert not checker.accepts(grammar, "Adding [TOOL:calculator:(2 + 3) * / 4] now.")
    assert not checker.accepts(grammar, "[TOOL:database_query:SELECT 1]")
    assert not checker.accepts(grammar, "[a] [b] [c]")  # text outside markers never opens a bracket


async def test_a_contract_hint_that_cannot_be_honoured_costs_the_constraint_not_the_turn(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(method: Any) -> None:
        raise ConstraintError("listing_method 'ListNothing' is not a method of the service")

    monkeypatch.setattr(constrained_tools, "argument_hint", broken)
    tools = constrained_tools.ConstrainedTools("auto", ToolRegistry.for_services(["file_reader"]), max_bytes=60)
    with caplog.at_level("WARNING", logger="heist.orchestrator.constrained"):
        assert await tools.inline("file_reader", None) is None
        assert await tools.inline("file_reader", None) is None
        assert await tools.chat_grammar(["file_reader"], None) is None
    assert [record.getMessage() for record in caplog.records] == [
        "no constraint for file_reader.ReadFile: listing_method 'ListNothing' is not a method of the service"
    ]


async def test_strict_definitions_are_built_again_only_when_a_constraint_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every request may carry the same definitions object, until a listing brings a new document."""
    registry = ToolRegistry.for_services(["file_reader"])
    method = registry.service("file_reader").inline_method
    assert method is not None
    methods = list(registry.service("file_reader").methods)

    async def cached(tool: str, method_name: str, fetch: Any) -> Any:
        return current.get(method_name)

    def build(names: tuple[str, ...]) -> dict[str, Any]:
        return {method.method.name: build_constraint("file_reader", method.method, Listing(names=names), max_bytes=60)}

    tools = constrained_tools.ConstrainedTools("auto", registry, max_bytes=60)
    monkeypatch.setattr(tools.cache, "get", cached)
    current = build(DOCUMENTS)
    first = await tools.strict_functions(methods, None)
    assert await tools.strict_functions(methods, None) is first  # nothing changed: the very same object

    current = build((*DOCUMENTS, "escape_route.md"))  # a new listing, so a new constraint
    second = await tools.strict_functions(methods, None)
    assert second is not first
    read = {tool["function"]["name"]: tool["function"] for tool in second}["file_reader_read_file"]
    assert sorted(read["parameters"]["properties"]["filename"]["enum"]) == sorted([*DOCUMENTS, "escape_route.md"])
    assert await tools.strict_functions(methods, None) is second
