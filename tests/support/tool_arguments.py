"""Ask the embedded model for a tool argument the way a transcript turn does, and judge it like the service.

Shared by the constrained-tools test and ``tests/bench/constrained_tools_eval.py``.

* ``transcript_prompt`` is the agent's own prompt (``orchestrator.turn.prompts``)
  for a tool agent's turn from config/heist.yaml, after two earlier lines,
  ending in the ``[TOOL:<tool>:`` prefill the agent adds.
* ``ServiceLogic`` judges an argument with the servers' own code, minus gRPC:
  ``Evaluator`` (calculator), ``DocumentFolder.read`` (file reader) and
  ``BankQueries.query`` (what a database query worker runs, SQLite's
  authorizer included) on a freshly built bank database, each with its
  service's default ``Limits``.
  What they accept, the services accept.
* ``argument_of`` extracts the argument the way the agent does:
  ``close_prefill`` then ``markers.find``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.message import Message
from heist.database_query.v1 import database_query_pb2
from heist.file_reader.v1 import file_reader_pb2

from heist_common.config import load_config
from heist_common.tools.argument_grammars import ONE_OF_LISTING, SQL_SELECT, Listing, listing_from_response
from heist_common.tools.registry import ToolRegistry
from orchestrator.tools import markers
from orchestrator.turn.prompts import ConversationMessage, close_prefill, transcript_tool_brief
from orchestrator.turn.prompts import transcript_prompt as agent_transcript_prompt
from servers import calculator, file_reader
from servers.calculator import CalculationError, Evaluator
from servers.database_query import service as database_query
from servers.database_query.bank_fixture import build as build_bank_db
from servers.database_query.service import DatabaseQueryServicer, worker_limits
from servers.database_query.worker import BankQueries, QueryFailure
from servers.file_reader import DocumentError, DocumentFolder, FileReaderServicer
from tests.support.processes import REPO

TOOLS = ("calculator", "file_reader", "database_query")
CONFIG = REPO / "config" / "heist.yaml"
EARLIER_LINES = (
    ("planner", "Mastermind", "Friday night is the job. Everyone, tell me what you know and what we need."),
    ("hacker", "Hacker", "The alarm panel is in the control room on level -1."),
)
"""A short meeting so far, so the prompt has the shape of a real turn (not a first line)."""


def transcript_prompt(tool: str, registry: ToolRegistry | None = None) -> tuple[str, str]:
    """Return (prompt ending in the marker prefill, prefill) for the agent that uses ``tool``."""
    config = load_config(CONFIG)
    agent = next(a for a in config.agents if tool in a.tools)
    method = (registry or ToolRegistry.for_services(TOOLS)).service(tool).inline_method
    assert method is not None
    history = [ConversationMessage(turn, name, role, text) for turn, (name, role, text) in enumerate(EARLIER_LINES, 1)]
    brief = transcript_tool_brief(agent.name, [method])
    prompt, _ = agent_transcript_prompt(agent, config.session, history, "", brief)
    prefill = " " + markers.opening(tool)  # what TranscriptStyle._tool_prefill starts the line with
    return prompt + prefill, prefill


def argument_of(prefill: str, continuation: str) -> str | None:
    """The argument the agent would send for this continuation (None: no marker survives)."""
    found = markers.find(close_prefill(prefill, continuation.strip()))
    return found[0].argument if found else None


class ServiceLogic:
    """The three tool services' acceptance logic, in-process and without gRPC."""

    def __init__(self, data_dir: Path, documents_dir: Path | None = None) -> None:
        self.evaluator = Evaluator(calculator.Limits())
        files = file_reader.Limits() if documents_dir is None else file_reader.Limits(documents_dir=documents_dir)
        self.file_limits = files
        self.folder = DocumentFolder(files)
        self.bank_path = data_dir / "bank.db"
        build_bank_db(self.bank_path)
        self.bank_limits = database_query.Limits()
        self.bank = BankQueries(self.bank_path, worker_limits(self.bank_limits))  # what a query worker runs

    def refusal(self, tool: str, argument: str | None) -> str | None:
        """Why the service would refuse ``argument`` (None: it would answer)."""
        if argument is None:
            return "no tool marker"
        try:
            if tool == "calculator":
                float(self.evaluator.evaluate(argument))
            elif tool == "file_reader":
                self.folder.read(argument)
            elif tool == "database_query":
                self.bank.query(argument, self.bank_limits.query_timeout_s)
            else:
                raise ValueError(f"unknown tool {tool}")
        except (CalculationError, OverflowError) as exc:
            return str(exc) or type(exc).__name__
        except (DocumentError, QueryFailure) as exc:
            return exc.message
        return None

    async def list_files(self) -> Message:
        """``ListFiles`` as the file reader's servicer answers it."""
        servicer = FileReaderServicer(self.file_limits)
        return await servicer.ListFiles(file_reader_pb2.ListFilesRequest(), None)  # type: ignore[arg-type]

    async def list_tables(self) -> Message:
        """``ListTables`` as the database service's servicer answers it (no query worker is started)."""
        servicer = DatabaseQueryServicer(self.bank_path, self.bank_limits)
        return await servicer.ListTables(database_query_pb2.ListTablesRequest(), None)  # type: ignore[arg-type]

    def listing(self, tool: str) -> Listing | None:
        """What the service's listing method reports, through its servicer (None: the tool has no listing)."""
        if tool == "file_reader":
            return listing_from_response(ONE_OF_LISTING, asyncio.run(self.list_files()))
        if tool == "database_query":
            return listing_from_response(SQL_SELECT, asyncio.run(self.list_tables()))
        return None


@dataclass(frozen=True)
class Sample:
    """One generated argument and the service's verdict."""

    tool: str
    seed: int
    continuation: str
    argument: str | None
    refusal: str | None
    tokens: int
    seconds: float
    truncated: bool


def generate(
    llm: Any,
    tool: str,
    prompt: str,
    prefill: str,
    seed: int,
    logic: ServiceLogic,
    *,
    grammar: Any = None,
    max_tokens: int = 60,
    temperature: float = 0.7,
) -> Sample:
    """One completion with the config's sampling (top_k 40, repeat_penalty 1.3, newline stops), judged."""
    start = time.perf_counter()
    out = llm.create_completion(
        prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=40,
        repeat_penalty=1.3,
        stop=["\n"],
        seed=seed,
        grammar=grammar,
    )
    seconds = time.perf_counter() - start
    choice = out["choices"][0]
    argument = argument_of(prefill, choice["text"])
    return Sample(
        tool=tool,
        seed=seed,
        continuation=choice["text"],
        argument=argument,
        refusal=logic.refusal(tool, argument),
        tokens=int(out["usage"]["completion_tokens"]),
        seconds=seconds,
        truncated=choice["finish_reason"] == "length",
    )
