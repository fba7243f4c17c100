"""``orchestrator``: run a heist session and inspect the audit trail.

Exit codes (``heist_common.exit_codes``, shared with ``make``): 0 ok; 1 failed
(the session ended ``failed``, a file could not be written); 2 bad arguments;
3 bad configuration; 4 audit database unreachable; 5 unknown session;
6 unhealthy (``health`` when something is down, ``run --require-healthy``);
130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from heist_common.exit_codes import ExitCode

# Each command imports what it uses, when it runs: `--help`, `sessions`, `show` and
# `export` never load gRPC or the LLM client, and nothing loads `openai` before a
# completion is made (its import alone takes most of a second).
if TYPE_CHECKING:
    from heist_common.config import HeistConfig
    from orchestrator.agent import TurnResult
    from orchestrator.audit import AuditStore
    from orchestrator.clients import HealthResult
    from orchestrator.runner import SessionResult

__all__ = ["main"]


class CommandError(Exception):
    """A user-facing failure: message for stderr plus exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrator", description="Run heist-planning sessions over the gRPC mesh and inspect their audit trail."
    )
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
    run.add_argument("--seed", type=int, default=None, help="seed for the random turn strategy")
    run.add_argument("--llm-base-url", default=None, help="OpenAI-compatible endpoint (default: llm.base_url)")
    run.add_argument("--model", default=None, help="model name (default: llm.model)")
    run.add_argument("--require-healthy", action="store_true", help="exit 6 before any turn if a service is down")
    run.add_argument("--out", type=Path, default=None, help="folder for the JSON and Markdown logs")

    health = commands.add_parser("health", help="health table of every service", description="Check every service.")
    health.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file")

    sessions = commands.add_parser("sessions", help="list sessions", description="List the audited sessions.")
    sessions.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file")
    sessions.add_argument("--db", default=argparse.SUPPRESS, help="audit database URL")

    show = commands.add_parser("show", help="transcript of a session", description="Show one session's transcript.")
    show.add_argument("session_id", metavar="SESSION")
    show.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file")
    show.add_argument("--db", default=argparse.SUPPRESS, help="audit database URL")

    export = commands.add_parser("export", help="export a session log", description="Export one session's log.")
    export.add_argument("session_id", metavar="SESSION")
    export.add_argument("--format", choices=("json", "md"), default="json", help="output format (default: json)")
    export.add_argument("--out", type=Path, default=None, help="output file (default: stdout)")
    export.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file")
    export.add_argument("--db", default=argparse.SUPPRESS, help="audit database URL")
    return parser


def _load(args: argparse.Namespace) -> HeistConfig:
    from heist_common.config import ConfigError, default_config_path, load_config

    path = args.config if args.config is not None else default_config_path()
    try:
        config = load_config(path)
    except ConfigError as exc:
        raise CommandError(f"configuration error: {exc}", ExitCode.CONFIG) from None
    if getattr(args, "db", None):
        config = config.with_overrides(database=config.database.model_copy(update={"url": args.db}))
    return config


def _open_store(config: HeistConfig) -> AuditStore:
    from orchestrator.audit import AuditError, AuditStore

    try:
        return AuditStore.open(config.database.url)
    except AuditError as exc:
        raise CommandError(str(exc), ExitCode.DATABASE) from None


def print_health(results: Sequence[HealthResult]) -> None:
    """Print the service table: service, target, status, latency."""
    width = max(len(r.target) for r in results) if results else 10
    print(f"{'service':<16} {'target':<{width}} {'status':<13} {'latency':>9}")
    for r in results:
        note = f"  {r.detail}" if r.detail and not r.ok else ""
        print(f"{r.service:<16} {r.target:<{width}} {r.status:<13} {r.latency_ms:>7.1f}ms{note}")


def _print_health_verdict(results: Sequence[HealthResult]) -> None:
    print_health(results)
    down = [r.service for r in results if not r.ok]
    if down:
        print(f"System starting with degraded services: {', '.join(down)}")
    else:
        print("All services healthy.")
    print()


def print_turn(turn: TurnResult) -> None:
    """One turn as it happens."""
    # Long tool results (a whole document) would bury the conversation; `show` prints them in full.
    said = turn.message if len(turn.message) <= TURN_PRINT_CHARS else turn.message[: TURN_PRINT_CHARS - 3] + "..."
    print(f"[turn {turn.turn_id}] {turn.agent_name} ({turn.agent_role}): {said}")
    for row in turn.tool_usage:
        outcome = "ok" if row.success else f"failed {row.status_code}"
        print(f"    tool {row.tool_name}.{row.operation} {row.tool_params} -> {outcome}")
    for event in turn.events:
        if event.status_code != "OK":
            print(f"    ! {event.service}.{event.operation} {event.status_code}: {event.detail}")


def _print_summary(result: SessionResult) -> None:
    print()
    print(f"Session:    {result.session_id} ({result.status})")
    print(f"Turns:      {len(result.turns)}")
    print(f"Tool calls: {result.tool_calls_ok} ok, {result.tool_calls_failed} failed")
    print(f"Errors:     {result.errors}")
    print(f"Audit DB:   {result.database}")
    if result.exports:
        print(f"Logs:       {', '.join(str(path) for path in result.exports)}")
    if result.error:
        print(f"Error:      {result.error}", file=sys.stderr)


def _cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from orchestrator.audit import AuditError
    from orchestrator.runner import RunOptions, run_session

    config = _load(args)
    if args.llm_base_url or args.model:
        llm = config.llm.model_copy(
            update={
                "base_url": (args.llm_base_url or config.llm.base_url).rstrip("/"),
                "model": args.model or config.llm.model,
            }
        )
        config = config.with_overrides(llm=llm)
    if args.turns is not None and args.turns < 1:
        raise CommandError("--turns must be at least 1", ExitCode.USAGE)
    options = RunOptions(
        session_id=args.session_id,
        turns=args.turns,
        seed=args.seed,
        require_healthy=args.require_healthy,
        export_dir=args.out,
    )
    try:
        result = asyncio.run(run_session(config, options, on_health=_print_health_verdict, on_turn=print_turn))
    except AuditError as exc:
        raise CommandError(str(exc), ExitCode.DATABASE) from None
    except ValueError as exc:  # invalid --session-id
        raise CommandError(str(exc), ExitCode.USAGE) from None
    _print_summary(result)
    return result.exit_code


def _cmd_health(args: argparse.Namespace) -> int:
    import asyncio

    from orchestrator.clients import ServiceClients
    from orchestrator.llm import LLMClient
    from orchestrator.runner import check_health

    config = _load(args)

    async def probe() -> list[HealthResult]:
        clients, llm = ServiceClients(config), LLMClient(config.llm)
        try:
            return await check_health(clients, llm, config.resilience.health_timeout_s)
        finally:
            await clients.close()
            await llm.close()

    results = asyncio.run(probe())
    print_health(results)
    return ExitCode.OK if all(r.ok for r in results) else ExitCode.UNHEALTHY


def _cmd_sessions(args: argparse.Namespace) -> int:
    store = _open_store(_load(args))
    try:
        rows = store.read_sessions()
    finally:
        store.close()
    if not rows:
        print("No sessions yet.")
        return 0
    print(f"{'session':<32} {'status':<12} {'turns':>5}  {'start':<29} end")
    for row in rows:
        print(
            f"{row['session_id']:<32} {row['status']:<12} {row['num_turns']:>5}  {row['start_time']:<29} "
            f"{row['end_time'] or '-'}"
        )
    return 0


def _read_log(args: argparse.Namespace) -> dict[str, object]:
    from orchestrator.audit import UnknownSessionError

    store = _open_store(_load(args))
    try:
        return store.read_session_log(args.session_id)
    except UnknownSessionError:
        message = f"unknown session {args.session_id!r} (see 'orchestrator sessions')"
        raise CommandError(message, ExitCode.UNKNOWN_SESSION) from None
    finally:
        store.close()


def _cmd_show(args: argparse.Namespace) -> int:
    from orchestrator.export import render_markdown

    print(render_markdown(_read_log(args)), end="")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from orchestrator.export import render_json, render_markdown

    log = _read_log(args)
    text = render_json(log) if args.format == "json" else render_markdown(log)
    if args.out is None:
        print(text, end="")
        return 0
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CommandError(f"cannot write {args.out}: {exc.strerror or exc}", ExitCode.FAILED) from None
    print(f"wrote {args.out}")
    return 0


TURN_PRINT_CHARS = 300
"""How much of a turn's message `run` prints as it happens."""

COMMANDS = {"run": _cmd_run, "health": _cmd_health, "sessions": _cmd_sessions, "show": _cmd_show, "export": _cmd_export}


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code (also usable from tests)."""
    args = _parser().parse_args(argv)
    if not hasattr(args, "config"):
        args.config = None
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


if __name__ == "__main__":
    sys.exit(main())
