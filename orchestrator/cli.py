"""``orchestrator``: run a heist session and inspect the audit trail.

Exit codes (``heist_common.exit_codes``, shared with ``make``): 0 ok; 1 failed
(the session ended ``failed``, a file could not be written); 2 bad arguments;
3 bad configuration; 4 audit database unreachable; 5 unknown session;
6 unhealthy (``health`` when something is down, ``run --require-healthy``);
7 not resumable (``resume`` of a completed, degraded or still running session);
8 degraded (every turn ran, but the crew could not use a service: every call to it
failed; the summary names it); 9 not pending (``approve``/``deny`` of a call that
does not wait for a decision); 130 interrupted.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from heist_common.exit_codes import ExitCode
from heist_common.layout import use_private_umask
from orchestrator.output.text import CONTROL_CHARACTERS

# Each command imports what it uses, when it runs: `--help`, `sessions`, `show` and
# `export` never load gRPC or the LLM client, and nothing loads `openai` before a
# completion is made (its import alone takes most of a second).
if TYPE_CHECKING:
    from heist_common.audit import AuditStore
    from heist_common.audit.approvals import PendingCall
    from heist_common.config import HeistConfig
    from orchestrator.mesh.clients import HealthResult
    from orchestrator.session.resume import ResumePoint
    from orchestrator.session.runner import SessionResult
    from orchestrator.turn.approval import ApprovalHooks
    from orchestrator.turn.progress import TurnProgress
    from orchestrator.turn.turn import Turn

__all__ = ["console_main", "main"]


class CommandError(Exception):
    """A user-facing failure: message for stderr plus exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (exit 2, ``ExitCode.USAGE``): the problem, and where help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")


class _Version(argparse.Action):
    """``--version``: the installed package's version (read only when asked: the metadata costs a few ms)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version(PACKAGE)
        except PackageNotFoundError:  # run from a source tree that was never installed
            found = "unknown (not installed)"
        print(f"orchestrator {found}")
        parser.exit(0)


PACKAGE = "heist-mesh"
"""The distribution ``orchestrator`` belongs to (pyproject.toml's ``name``)."""
JSON_HELP = "print JSON, one object per line (fields: docs/cli.md)"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="orchestrator", description="Run heist-planning sessions over the gRPC mesh and inspect their audit trail."
    )
    parser.add_argument("--version", action=_Version)
    parser.add_argument(
        "--config", type=Path, default=None, help="config file (default: $HEIST_CONFIG or config/heist.yaml)"
    )
    parser.add_argument("--db", default=None, help="audit database URL (default: database.url from the config)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="play one heist session", description="Play one heist session.")
    run.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file")
    run.add_argument("--db", default=argparse.SUPPRESS, help="audit database URL")
    run.add_argument("--turns", type=int, default=None, help="number of agent turns (default: session.max_turns)")
    run.add_argument("--session-id", default=None, help="use this session ID instead of a generated one")
    run.add_argument("--seed", type=_seed, default=None, help="seed for the random turn strategy (0 to 2**63-1)")
    run.add_argument("--llm-base-url", default=None, help="OpenAI-compatible endpoint (default: llm.base_url)")
    run.add_argument("--model", default=None, help="model name (default: llm.model)")
    run.add_argument("--require-healthy", action="store_true", help="exit 6 before any turn if a service is down")
    run.add_argument("--out", type=Path, default=None, help="folder for the JSON and Markdown logs")
    run.add_argument("--json", action="store_true", help="print each turn, then the summary, as JSON lines")
    run.add_argument(
        "--no-prompt",
        action="store_true",
        help="never ask y/n on this terminal: calls that need approval wait for 'orchestrator approve'/'deny'",
    )

    health = commands.add_parser("health", help="health table of every service", description="Check every service.")
    health.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file")
    health.add_argument("--json", action="store_true", help=JSON_HELP)

    token = commands.add_parser(
        "token",
        help="print an OAuth access token",
        description="Print an access token for an OAuth client (for grpcurl and other manual calls). The "
        "client's secret is read from the credentials (clients.json, or HEIST_OAUTH_CLIENT_SECRET_<CLIENT_ID>), "
        "never from the command line, where any local user could read it.",
    )
    token.add_argument("--client", default="grpcurl", help="OAuth client id (default: grpcurl)")
    token.add_argument("--scope", dest="scopes", action="append", required=True, help="a scope to ask for (repeat)")
    token.add_argument("--session", default="", help="bind the token to this session ID (x-session-id)")
    token.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file")

    sessions = commands.add_parser("sessions", help="list sessions", description="List the audited sessions.")
    sessions.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file")
    sessions.add_argument("--db", default=argparse.SUPPRESS, help="audit database URL")
    sessions.add_argument("--json", action="store_true", help=JSON_HELP)

    show = commands.add_parser("show", help="transcript of a session", description="Show one session's transcript.")
    show.add_argument("session_id", metavar="SESSION")
    show.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file")
    show.add_argument("--db", default=argparse.SUPPRESS, help="audit database URL")
    show.add_argument("--json", action="store_true", help="print the session's whole log as one JSON object")

    export = commands.add_parser("export", help="export a session log", description="Export one session's log.")
    export.add_argument("session_id", metavar="SESSION")
    export.add_argument("--format", choices=("json", "md"), default="json", help="output format (default: json)")
    export.add_argument("--out", type=Path, default=None, help="output file (default: stdout)")
    export.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file")
    export.add_argument("--db", default=argparse.SUPPRESS, help="audit database URL")
    _add_resume_parser(commands)
    _add_approval_parsers(commands)

    report = commands.add_parser(
        "report",
        help="one self-contained HTML page of a session",
        description="Write one session's report: transcript, per-turn waterfalls, service latency, health at start. "
        "The page loads nothing from the network.",
    )
    report.add_argument("session_id", metavar="SESSION")
    report.add_argument("--out", type=Path, default=None, help="output file (default: <run_dir>/sessions/SESSION.html)")
    report.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file")
    report.add_argument("--db", default=argparse.SUPPRESS, help="audit database URL")
    return parser


RESUME_EPILOG = """\
An 'active' session is still running unless its process on this machine is
gone (kill -9, a crash) or it committed no turn for session.stale_after_s
seconds (default 600). The session keeps its ID, strategy, seed and planned
turns; the conversation and the memory service are rebuilt from the audit.

exit codes: 0 completed; 1 failed; 3 the config no longer gives the session's
schedule; 4 audit database unreachable; 5 unknown session; 6 unhealthy with
--require-healthy; 7 not resumable (completed, degraded, or still running);
8 degraded (a service never worked during the resumed turns); 130 interrupted.
"""


def _add_resume_parser(commands: argparse._SubParsersAction[_Parser]) -> None:
    resume = commands.add_parser(
        "resume",
        help="continue an interrupted, failed or dead session",
        description="Continue an interrupted, failed or stale session from the audit alone.",
        epilog=RESUME_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    resume.add_argument("session_id", metavar="SESSION")
    resume.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file")
    resume.add_argument("--db", default=argparse.SUPPRESS, help="audit database URL")
    resume.add_argument("--llm-base-url", default=None, help="OpenAI-compatible endpoint (default: llm.base_url)")
    resume.add_argument("--model", default=None, help="model name (default: llm.model)")
    resume.add_argument("--require-healthy", action="store_true", help="exit 6 before any turn if a service is down")
    resume.add_argument("--out", type=Path, default=None, help="folder for the JSON and Markdown logs")
    resume.add_argument(
        "--no-prompt", action="store_true", help="never ask y/n on this terminal (decide with 'orchestrator approve')"
    )


def _add_approval_parsers(commands: argparse._SubParsersAction[_Parser]) -> None:
    approvals = commands.add_parser(
        "approvals",
        help="tool calls waiting for approval",
        description="List the tool calls that wait for a person's approval (docs/approvals.md).",
    )
    approvals.add_argument("session_id", metavar="SESSION", nargs="?", default=None, help="only this session's")
    approvals.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    approvals.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file")
    approvals.add_argument("--db", default=argparse.SUPPRESS, help="audit database URL")
    for name, verb in (("approve", "Approve"), ("deny", "Deny")):
        decide = commands.add_parser(
            name,
            help=f"{name} a tool call that waits",
            description=f"{verb} a tool call that waits for approval; the audit records who (the OS user) and when. "
            "The session's process, or the next 'orchestrator resume', acts on it.",
        )
        decide.add_argument("session_id", metavar="SESSION")
        decide.add_argument("call_id", metavar="CALL_ID", help="as 'orchestrator approvals' shows it, e.g. 3.1")
        decide.add_argument(
            "--reason", required=name == "deny", default="", help="why (shown to the model; at most 1000 characters)"
        )
        decide.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file")
        decide.add_argument("--db", default=argparse.SUPPRESS, help="audit database URL")


def _seed(text: str) -> int:
    """Parse a ``--seed`` value: it is stored in the audit as a 64-bit integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text[:40]!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError("must be from 0 to 2**63-1")
    return value


def _load(args: argparse.Namespace, *, calls_services: bool = True) -> HeistConfig:
    """Load the config with ``--db``; commands that only read the audit skip the contract check."""
    from pydantic import ValidationError

    from heist_common.config import (
        ConfigError,
        DatabaseConfig,
        default_config_path,
        format_validation_error,
        load_config,
        resolve_database_url,
    )

    path = args.config if args.config is not None else default_config_path()
    try:
        config = load_config(path, check_contracts=calls_services)
    except ConfigError as exc:
        raise CommandError(f"configuration error: {exc}", ExitCode.CONFIG) from None
    config.mesh.make_private()
    if getattr(args, "db", None):
        try:
            database = DatabaseConfig(url=resolve_database_url(args.db, config.mesh.run_dir))
        except ValidationError as exc:
            raise CommandError(format_validation_error(exc, "--db"), ExitCode.USAGE) from None
        config = config.with_overrides(database=database)
    return config


def _open_store(config: HeistConfig, *, create: bool) -> AuditStore:
    """Open the audit database; only ``run`` may create one, and only in a folder that exists.

    The default folder in the run folder is created; a path the user named must
    already have its folder, so a typo in ``--db`` fails instead of silently
    starting a new, empty audit trail somewhere else.
    """
    from heist_common.audit import AuditError, AuditStore
    from heist_common.config import redact_urls

    url = config.database.url
    path = Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") and ":memory:" not in url else None
    default = f"sqlite:///{config.mesh.audit_dir / 'heist.db'}"
    if path is not None and not create and not path.exists():
        raise CommandError(f"no audit database at {path} (nothing has run yet?)", ExitCode.DATABASE)
    if path is not None and create and url != default and not path.parent.is_dir():
        raise CommandError(f"cannot create the audit database: folder {path.parent} does not exist", ExitCode.DATABASE)
    try:
        return AuditStore.open(url)
    except AuditError as exc:
        raise CommandError(redact_urls(str(exc)), ExitCode.DATABASE) from None


def _unknown_session(session_id: str) -> CommandError:
    """Return the error for a session ID the audit does not know (exit 5), pointing at the list."""
    return CommandError(f"unknown session {session_id!r} (see 'orchestrator sessions')", ExitCode.UNKNOWN_SESSION)


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a container stop, kill) ends a run like Ctrl-C: the session is marked interrupted (and resumable).

    Only the main thread may set signal handlers; elsewhere (tests call ``main`` in a worker) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _credentials_checked() -> Iterator[None]:
    """Missing or unreadable certificates and secrets are a configuration problem (exit 3), never a traceback."""
    from heist_common.credentials import CredentialsError

    try:
        yield
    except CredentialsError as exc:
        raise CommandError(f"credentials: {exc}", ExitCode.CONFIG) from None


def printable(text: str) -> str:
    """Text from the model or a caller, safe for a terminal: control characters shown escaped, never obeyed."""
    return CONTROL_CHARACTERS.sub(lambda match: repr(match.group())[1:-1], text)


def print_health(results: Sequence[HealthResult]) -> None:
    """Print the service table: service, target, status, latency, and why a service is not usable."""
    from orchestrator.output.terminal import table

    rows = [(r.service, r.target, r.status, f"{r.latency_ms:.1f}ms", r.detail if not r.ok else "") for r in results]
    for line in table(("service", "target", "status", "latency", "detail"), rows, right=("latency",)):
        print(printable(line))


def _print_health_verdict(results: Sequence[HealthResult]) -> None:
    print_health(results)
    down = [r.service for r in results if not r.ok]
    if down:
        print(f"System starting with degraded services: {', '.join(down)}")
    else:
        print("All services healthy.")
    print()


def print_turn(turn: Turn) -> None:
    """One turn as it happens."""
    # Long tool results (a whole document) would bury the conversation; `show` prints them in full.
    said = turn.message if len(turn.message) <= TURN_PRINT_CHARS else turn.message[: TURN_PRINT_CHARS - 3] + "..."
    print(printable(f"[turn {turn.turn_id}] {turn.agent_name} ({turn.agent_role}): {said}"))
    for row in turn.tool_usage:
        outcome = "ok" if row.success else f"failed {row.status_code}"
        print(printable(f"    tool {row.tool_name}.{row.operation} {row.tool_params} -> {outcome}"))
    for event in turn.events:
        if event.status_code != "OK":
            print(printable(f"    ! {event.service}.{event.operation} {event.status_code}: {event.detail}"))


def _print_summary(result: SessionResult) -> None:
    from heist_common.config import redact_url, redact_urls

    print()
    print(f"Session:    {result.session_id} ({result.status})")
    print(f"Turns:      {len(result.turns)}")
    print(f"Tool calls: {result.tool_calls_ok} ok, {result.tool_calls_failed} failed")
    empty = f" ({result.empty_turns} empty {'reply' if result.empty_turns == 1 else 'replies'})"
    print(f"Errors:     {result.errors}{empty if result.empty_turns else ''}")
    if result.tokens.session.counted_turns:
        print(f"LLM tokens: {result.tokens.session.describe()}")
        print(printable(f"  by agent: {result.tokens.describe_agents()}"))
    print(f"Audit DB:   {redact_url(result.database)}")
    if result.exports:
        print(f"Logs:       {', '.join(str(path) for path in result.exports)}")
    if result.report is not None:
        print(f"Report:     {result.report}")
    for path, reason in result.export_failures.items():
        print(f"Not written: {path} ({reason})")
    for session_id in result.settled:
        print(f"Recorded:   {session_id} ended failed (its end was kept while the database was unreachable)")
    error = result.error
    if result.unusable:
        # The crew could not work: say which service and why, where the eye lands (not as an error's tail).
        for service in result.unusable:
            print(printable(f"Degraded:   {redact_urls(service.describe())}"))
        described = "; ".join(service.describe() for service in result.unusable)
        error = error.removeprefix(described).removeprefix("; ") if error else error
    if error:
        print(printable(f"Error:      {redact_urls(error)}"), file=sys.stderr)


def _print_summary_json(result: SessionResult) -> None:
    from heist_common.config import redact_url, redact_urls
    from orchestrator.session.records import dumps, summary_record

    error = redact_urls(result.error) if result.error else None
    print(dumps(summary_record(result, database=redact_url(result.database), error=error)), flush=True)
    if error:
        print(printable(f"orchestrator: {error}"), file=sys.stderr)


def _live_line_wanted() -> bool:
    """Say whether to draw a live line: only on a terminal that can redraw one (not a log, a pipe, TERM=dumb)."""
    return sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb"


Above = Callable[[Callable[[], None]], None]
"""Runs a function that prints lines, where the live line is (erased first, drawn again at the next phase)."""


def _directly(write: Callable[[], None]) -> None:
    write()


@contextmanager
def _turn_output(
    session_id: str, *, as_json: bool
) -> Iterator[tuple[Callable[[Turn], None], TurnProgress | None, Above]]:
    """How ``run`` and ``resume`` show turns: JSON lines, or lines with a live line while each turn runs.

    The third value prints other lines (a call waiting for approval, its y/n question) without a redraw
    landing on them.
    """
    if as_json:
        from orchestrator.session.records import dumps, turn_record

        yield (lambda turn: print(dumps(turn_record(session_id, turn)), flush=True)), None, _directly
        return
    if not _live_line_wanted():
        yield print_turn, None, _directly
        return
    from orchestrator.output.live import LiveLine

    with LiveLine(sys.stdout) as live:
        yield (lambda turn: live.replace(lambda: print_turn(turn))), live, live.replace


def _with_llm_flags(config: HeistConfig, args: argparse.Namespace) -> HeistConfig:
    """Apply ``--llm-base-url`` and ``--model`` (run and resume take both)."""
    if not (args.llm_base_url or args.model):
        return config
    llm = config.llm.model_copy(
        update={
            "base_url": (args.llm_base_url or config.llm.base_url).rstrip("/"),
            "model": args.model or config.llm.model,
        }
    )
    return config.with_overrides(llm=llm)


def _cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from heist_common.audit import AuditError
    from heist_common.config import redact_urls
    from orchestrator.session.runner import RunOptions, new_session_id, run_session

    config = _with_llm_flags(_load(args), args)
    allowed = config.session.max_turns_allowed
    if args.turns is not None and not 1 <= args.turns <= allowed:
        raise CommandError(f"--turns must be 1 to {allowed} (session.max_turns_allowed)", ExitCode.USAGE)
    if args.out is not None:
        _check_writable(args.out)
    session_id = args.session_id or new_session_id()  # known here: every JSON line carries it
    options = RunOptions(
        session_id=session_id,
        turns=args.turns,
        seed=args.seed,
        require_healthy=args.require_healthy,
        export_dir=args.out,
    )
    _open_store(config, create=True).close()  # a bad --db fails here, before any service is called
    on_health = None if args.json else _print_health_verdict
    try:
        with (
            _sigterm_interrupts(),
            _credentials_checked(),
            _turn_output(session_id, as_json=args.json) as (on_turn, on_progress, above),
        ):
            result = asyncio.run(
                run_session(
                    config,
                    options,
                    on_health=on_health,
                    on_turn=on_turn,
                    on_progress=on_progress,
                    approval_hooks=_approval_hooks(args, above),
                )
            )
    except AuditError as exc:
        raise CommandError(redact_urls(str(exc)), ExitCode.DATABASE) from None
    except ValueError as exc:  # invalid --session-id
        raise CommandError(str(exc), ExitCode.USAGE) from None
    if args.json:
        _print_summary_json(result)
    else:
        _print_summary(result)
    return result.exit_code


def _print_resume(point: ResumePoint) -> None:
    print(f"Resuming {point.session_id}: {point.describe()}")
    print()


def _cmd_resume(args: argparse.Namespace) -> int:
    import asyncio

    from heist_common.audit import AuditError, UnknownSessionError
    from heist_common.config import redact_urls
    from orchestrator.session.resume import NotResumableError, ResumeConflictError
    from orchestrator.session.runner import RunOptions, resume_session

    config = _with_llm_flags(_load(args), args)
    if args.out is not None:
        _check_writable(args.out)
    options = RunOptions(require_healthy=args.require_healthy, export_dir=args.out)
    _open_store(config, create=False).close()  # resume never creates an audit database
    try:
        with (
            _sigterm_interrupts(),
            _credentials_checked(),
            _turn_output(args.session_id, as_json=False) as (on_turn, on_progress, above),
        ):
            result = asyncio.run(
                resume_session(
                    config,
                    args.session_id,
                    options,
                    on_resume=_print_resume,
                    on_health=_print_health_verdict,
                    on_turn=on_turn,
                    on_progress=on_progress,
                    approval_hooks=_approval_hooks(args, above),
                )
            )
    except UnknownSessionError:
        raise _unknown_session(args.session_id) from None
    except NotResumableError as exc:
        raise CommandError(f"cannot resume: {exc}", ExitCode.NOT_RESUMABLE) from None
    except ResumeConflictError as exc:
        raise CommandError(f"cannot resume: {exc}", ExitCode.CONFIG) from None
    except AuditError as exc:
        raise CommandError(redact_urls(str(exc)), ExitCode.DATABASE) from None
    _print_summary(result)
    if result.turns_before:
        print(f"Resumed:    after turn {result.turns_before}; {result.turns_before + len(result.turns)} turns in all")
    return result.exit_code


def _cli_prefix(args: argparse.Namespace) -> str:
    """``orchestrator`` with this command's ``--config`` and ``--db``: what a command printed for the user needs."""
    import shlex

    from heist_common.config import redact_url

    words = ["orchestrator"]
    if args.config is not None:
        words += ["--config", shlex.quote(str(args.config))]
    database = getattr(args, "db", None)
    if database:  # a URL with a password is never printed: the user fills it in
        words += ["--db", shlex.quote(database) if redact_url(database) == database else "<URL>"]
    return " ".join(words)


def _approval_hooks(args: argparse.Namespace, above: Above = _directly) -> ApprovalHooks:
    """Announce every call that waits with the commands that decide it; on a terminal, also ask y/n in place."""
    from orchestrator.turn.approval import ApprovalHooks

    prefix = _cli_prefix(args)

    out = sys.stderr if getattr(args, "json", False) else sys.stdout  # --json: stdout holds JSON lines only

    def announce(call: PendingCall, seconds_left: float) -> None:
        ref = f"{call.session_id} {call.call_id}"

        def lines() -> None:
            print(
                printable(
                    f"Waiting for approval: call {call.call_id} of {call.session_id}: {call.agent_name} wants "
                    f"{call.tool_name}.{call.operation} {call.arguments}"
                ),
                file=out,
            )
            print(f"  approve: {prefix} approve {ref}", file=out)
            print(f"  deny:    {prefix} deny {ref} --reason TEXT", file=out)
            print(f"  (denied by timeout in {seconds_left:.0f} s: session.approval_timeout_s)", file=out, flush=True)

        above(lines)  # the live line is erased first and stays so until the next phase

    interactive = not args.no_prompt and sys.stdin.isatty() and sys.stdout.isatty()
    return ApprovalHooks(prompt=_ask_on_terminal if interactive else None, announce=announce)


async def _ask_on_terminal(call: PendingCall) -> bool | None:
    """Ask y/n on the terminal without blocking the event loop (a decision from elsewhere cancels the question)."""
    print(f"Approve call {call.call_id}? [y/n] ", end="", flush=True)
    while True:
        line = await _read_line()
        if line is None:  # end of input: leave the decision to another terminal
            return None
        answer = line.strip().lower()
        if answer in ("y", "yes"):
            return True
        if answer in ("n", "no"):
            return False
        print("Please answer y or n: ", end="", flush=True)


async def _read_line() -> str | None:
    import asyncio

    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()
    descriptor = sys.stdin.fileno()

    def readable() -> None:
        if not future.done():
            future.set_result(sys.stdin.readline())

    loop.add_reader(descriptor, readable)
    try:
        line = await future
    finally:
        loop.remove_reader(descriptor)
    return line or None


def _cmd_approvals(args: argparse.Namespace) -> int:
    import json

    from heist_common.audit import CallStatus
    from heist_common.audit.approvals import PendingCall

    store = _open_store(_load(args, calls_services=False), create=False)
    try:
        if args.session_id is not None and not store.session_exists(args.session_id):
            raise _unknown_session(args.session_id)
        rows = store.read_tool_calls(args.session_id, CallStatus.PENDING_APPROVAL)
    finally:
        store.close()
    pending = [PendingCall.from_record(row) for row in rows]
    if args.json:
        print(printable(json.dumps([call.as_json() for call in pending], indent=2, ensure_ascii=False)))
        return 0
    if not pending:
        print("No tool calls wait for approval.")
        return 0
    print(f"{'session':<40} {'call':<8} {'agent':<12} {'tool':<28} {'waiting since':<29} arguments")
    for call in pending:
        arguments = call.arguments if len(call.arguments) <= 80 else call.arguments[:77] + "..."
        print(
            printable(
                f"{call.session_id:<40} {call.call_id:<8} {call.agent_name:<12} "
                f"{call.tool_name + '.' + call.operation:<28} {call.waiting_since:<29} {arguments}"
            )
        )
    return 0


def _cmd_decide(args: argparse.Namespace) -> int:
    from heist_common.audit import AuditError, CallNotPendingError, UnknownCallError, UnknownSessionError
    from heist_common.audit.approvals import check_decision, os_user

    approve = args.command == "approve"
    who = os_user()
    try:
        check_decision(args.reason, who)
    except ValueError as exc:
        raise CommandError(f"--reason: {exc}", ExitCode.USAGE) from None
    store = _open_store(_load(args, calls_services=False), create=False)
    try:
        row = store.decide_now(args.session_id, args.call_id, approve, args.reason, who)
    except UnknownSessionError:
        raise _unknown_session(args.session_id) from None
    except (UnknownCallError, CallNotPendingError) as exc:
        raise CommandError(str(exc).strip("'\""), ExitCode.NOT_PENDING) from None
    except AuditError as exc:
        raise CommandError(str(exc), ExitCode.DATABASE) from None
    finally:
        store.close()
    print(
        printable(
            f"{row['status']}: call {args.call_id} of {args.session_id} ({row['tool_name']}.{row['operation']}) "
            f"by {who} at {row['decided_at']}"
        )
    )
    return 0


def _check_writable(folder: Path) -> None:
    """Fail before the run, not after it, when the session logs could not be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".heist-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CommandError(f"cannot write session logs to {folder}: {exc.strerror or exc}", ExitCode.FAILED) from None


def _cmd_health(args: argparse.Namespace) -> int:
    import asyncio

    from orchestrator.llm.client import LLMClient
    from orchestrator.mesh.clients import ServiceClients
    from orchestrator.session.health import check_health

    config = _load(args)

    async def probe() -> list[HealthResult]:
        clients, llm = ServiceClients(config), LLMClient(config.llm)
        try:
            return await check_health(clients, llm, config.resilience.health_timeout_s)
        finally:
            await clients.close()
            await llm.close()

    with _credentials_checked():
        results = asyncio.run(probe())
    if args.json:
        from orchestrator.session.records import dumps, health_record

        for result in results:
            print(dumps(health_record(result)))
    else:
        print_health(results)
    return ExitCode.OK if all(r.ok for r in results) else ExitCode.UNHEALTHY


def _cmd_token(args: argparse.Namespace) -> int:
    import asyncio

    from orchestrator.mesh.clients import ServiceCallError, ServiceClients, session_metadata

    config = _load(args)

    async def issue() -> str:
        clients = ServiceClients(config)
        try:
            metadata = session_metadata(args.session) if args.session else ()
            return await clients.tokens.token(args.client, args.scopes, metadata)
        finally:
            await clients.close()

    with _credentials_checked():
        try:
            token = asyncio.run(issue())
        except ServiceCallError as exc:
            if exc.status_code == "CREDENTIALS":
                raise CommandError(f"credentials: {exc.detail}", ExitCode.CONFIG) from None
            message = f"no token for {args.client!r}: {exc.status_code}: {exc.detail}"
            raise CommandError(message, ExitCode.FAILED) from None
    print(token)
    return ExitCode.OK


def _cmd_sessions(args: argparse.Namespace) -> int:
    config = _load(args, calls_services=False)
    url = config.database.url
    configured = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else None
    if not getattr(args, "db", None) and configured is not None and not Path(configured).exists():
        if not args.json:  # JSON: no line at all
            print("No sessions yet.")  # nothing has run with this config; a --db that does not exist is an error
        return 0
    store = _open_store(config, create=False)
    try:
        rows = store.read_sessions()
        tokens = store.read_token_counts()
    finally:
        store.close()
    if args.json:
        from orchestrator.session.records import dumps, session_record

        for row in rows:
            print(dumps(session_record(row, tokens.get(row["session_id"]))))
        return 0
    if not rows:
        print("No sessions yet.")
        return 0
    from orchestrator.output.terminal import table

    shown = []
    for row in rows:
        count = tokens.get(row["session_id"])
        used = "-" if count is None else f"{'~' if count.estimated else ''}{count.total}"
        shown.append((row["session_id"], row["status"], row["num_turns"], used, row["start_time"], row["end_time"]))
    for line in table(("session", "status", "turns", "tokens", "start", "end"), shown, right=("turns", "tokens")):
        print(printable(line))
    return 0


def _read_log(args: argparse.Namespace, config: HeistConfig | None = None) -> dict[str, object]:
    from heist_common.audit import UnknownSessionError

    store = _open_store(config or _load(args, calls_services=False), create=False)
    try:
        return store.read_session_log(args.session_id)
    except UnknownSessionError:
        raise _unknown_session(args.session_id) from None
    finally:
        store.close()


def _cmd_show(args: argparse.Namespace) -> int:
    log = _read_log(args)
    if args.json:
        from orchestrator.session.records import dumps

        print(dumps(log))
        return 0
    import shutil

    from orchestrator.output.terminal import render_transcript

    width = min(shutil.get_terminal_size((100, 24)).columns, 120) - 1
    print(render_transcript(log, width, printable), end="")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from orchestrator.output.atomic import write_atomically
    from orchestrator.output.export import render_json, render_markdown

    log = _read_log(args)
    text = render_json(log) if args.format == "json" else render_markdown(log)
    if args.out is None:
        print(printable(text), end="")
        return 0
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(args.out, text)
    except OSError as exc:
        raise CommandError(f"cannot write {args.out}: {exc.strerror or exc}", ExitCode.FAILED) from None
    print(f"wrote {args.out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from orchestrator.output.report import report_path, write_report

    config = _load(args, calls_services=False)
    log = _read_log(args, config)
    out = args.out if args.out is not None else report_path(config.sessions_dir, args.session_id)
    try:
        write_report(log, out)
    except OSError as exc:
        raise CommandError(f"cannot write {out}: {exc.strerror or exc}", ExitCode.FAILED) from None
    print(f"wrote {out}")
    return 0


TURN_PRINT_CHARS = 300
"""How much of a turn's message `run` prints as it happens."""

COMMANDS = {
    "run": _cmd_run,
    "health": _cmd_health,
    "token": _cmd_token,
    "sessions": _cmd_sessions,
    "show": _cmd_show,
    "export": _cmd_export,
    "resume": _cmd_resume,
    "report": _cmd_report,
    "approvals": _cmd_approvals,
    "approve": _cmd_decide,
    "deny": _cmd_decide,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code (tests call this; the console script is ``console_main``)."""
    args = _parser().parse_args(argv)
    if not hasattr(args, "config"):
        args.config = None
    # The audit, the session logs and reports hold every conversation: the owner's only, in --out folders too.
    umask = use_private_umask()
    try:
        return COMMANDS[args.command](args)
    except CommandError as exc:
        print(f"orchestrator: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("orchestrator: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        # `orchestrator sessions | head`: the reader left; not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        os.umask(umask)  # tests call main() in their own process


def console_main() -> int:
    """Run ``main()`` as the ``orchestrator`` console script, then exit without the final garbage collections.

    Why: with gRPC, protobuf, pydantic and httpx2 loaded, CPython's shutdown runs
    full garbage collections over tens of thousands of objects, a noticeable part
    of a command meant to answer at once (docs/performance.md). ``gc.freeze()`` moves
    every object to the permanent generation, so those collections skip them.
    Nothing is lost: by then each command has closed what it opened (audit store,
    channels, HTTP pool), and atexit handlers (the trace exporter's flush) still
    run. Only the console script does this; tests that call ``main()`` keep
    their collector.
    """
    try:
        return main()
    finally:
        gc.freeze()


if __name__ == "__main__":
    sys.exit(console_main())
