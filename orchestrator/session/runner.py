"""A whole heist session: health checks, the turn loop, the audit trail, the exports.

``run_session`` is the programmatic entry point (the CLI, drills and benchmarks
call it); ``SessionRunner`` is the same on an already open mesh, LLM client and
audit store, so many sessions can share one set of channels.

How a session that played all its turns ends: ``failed`` when the model never
answered (an empty reply is no answer: status ``empty``); else ``degraded``
(exit 8) when the crew could not use a service it needed (``unusable_services``:
a service the turns tried to call at least once, and not once with an answer);
else ``completed``.

A session over its token budget (``session.max_llm_tokens``, or an agent's
``agents[].max_llm_tokens``) ends ``failed`` after the turn that went over it
is recorded, with ``sessions.error`` starting ``budget:`` and an ``events`` row
(``orchestrator``/``budget``); a resumed session counts on from the audit's totals.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from heist_common.audit import AuditError, AuditStore, EventRow, SessionStatus, SessionTakenOverError, TokenTotals
from heist_common.config import HeistConfig
from heist_common.contract import SESSION_ID_PATTERN
from heist_common.exit_codes import ExitCode
from heist_common.telemetry import Telemetry, setup_metrics, setup_tracing
from orchestrator.llm.client import LLMClient
from orchestrator.mesh.clients import CIRCUIT_OPEN, HealthResult, ServiceClients
from orchestrator.output.export import SessionFiles, write_session_files
from orchestrator.session.health import check_health
from orchestrator.session.resume import ResumePoint, prepare_resume
from orchestrator.session.schedule import iter_schedule
from orchestrator.session.unrecorded import record_later, settle_unrecorded, unrecorded_dir
from orchestrator.tracing import rpc_service, turn_scope
from orchestrator.turn.agent import ConversationMessage, CrewAgent, MemoryFetch, SessionContext
from orchestrator.turn.approval import ApprovalHooks
from orchestrator.turn.progress import TurnProgress
from orchestrator.turn.turn import EMPTY, LLM_ERROR, OK, Turn

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider

__all__ = [
    "BUDGET",
    "BudgetExceeded",
    "RunOptions",
    "SessionResources",
    "SessionResult",
    "SessionRunner",
    "UnusableService",
    "new_session_id",
    "resume_session",
    "resumed_config",
    "run_session",
    "unusable_services",
]


TurnObserver = Callable[[Turn], None]
ORCHESTRATOR_SERVICE_NAME = "heist-orchestrator"
"""``service.name`` of the orchestrator's spans."""

SEED_LIMIT = 2**31
"""Generated seeds stay below this: they fit the INTEGER ``seed`` column of audit tables made before BIGINT."""


ANSWERED = frozenset({"OK", "INVALID_ARGUMENT", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION", "ALREADY_EXISTS"})
"""Outcomes of a call that show its service working: a result, or a judgement on the request itself."""
CONSEQUENCES = frozenset({CIRCUIT_OPEN})
"""Failures that follow from earlier ones (the breaker skipping a service), never shown as the cause."""
CAUSE_CHARS = 200
"""How much of a failure's message the summary and ``sessions.error`` keep."""


@dataclass(frozen=True)
class UnusableService:
    """A service the crew tried to call during the session and never got an answer from."""

    service: str
    attempts: int
    code: str
    """Status of the first failure (the cause; later ones, such as the breaker's skips, follow from it)."""
    detail: str = ""

    def describe(self) -> str:
        """``memory: 0 of 12 calls succeeded (UNAVAILABLE: ...)``."""
        detail = self.detail if len(self.detail) <= CAUSE_CHARS else self.detail[: CAUSE_CHARS - 3] + "..."
        cause = f"{self.code}: {detail}" if detail else self.code
        return f"{self.service}: 0 of {self.attempts} calls succeeded ({cause})"


def unusable_services(turns: Iterable[Turn], order: Sequence[str] = ()) -> list[UnusableService]:
    """Return the services the crew could not use at all in these turns: what makes a session ``degraded``.

    A call is every RPC a turn tried to make (``Turn.steps``): sent, skipped by an
    open circuit, or not sent for want of an OAuth token. A service is unusable
    when it was called at least once and no call was answered (``ANSWERED``:
    a request error such as NOT_FOUND still shows the service working). Tool
    calls refused before any RPC (not allowed, bad arguments) say nothing about
    a service and are not calls. A resumed session is judged by this run's turns.
    ``order`` lists services in the order to report them (the config's).
    """
    attempts: Counter[str] = Counter()
    answered: set[str] = set()
    first_failure: dict[str, str] = {}
    details: dict[tuple[str, str], str] = {}
    for turn in turns:
        for step in turn.steps:
            service = rpc_service(step)
            if service is None:
                continue
            attempts[service] += 1
            if step.code in ANSWERED:
                answered.add(service)
            elif step.code not in CONSEQUENCES:
                first_failure.setdefault(service, step.code)
        for event in turn.events:
            details.setdefault((event.service, event.status_code), event.detail)
    rank = {name: index for index, name in enumerate(order)}
    unusable = sorted((s for s in attempts if s not in answered), key=lambda s: (rank.get(s, len(rank)), s))
    found = []
    for service in unusable:
        code = first_failure.get(service, CIRCUIT_OPEN)
        found.append(UnusableService(service, attempts[service], code, details.get((service, code), "")))
    return found


class LLMBroken(Exception):
    """The LLM's circuit breaker tripped: too many consecutive turns failed to get an answer."""


BUDGET = "budget"
"""The reason a session over its token budget ended: ``sessions.error`` starts ``budget:``, its event's operation."""


class BudgetExceeded(Exception):
    """The session, or one agent, used more LLM tokens than the config allows."""

    def __init__(self, message: str, turn_id: int | None = None, agent: str | None = None) -> None:
        super().__init__(f"{BUDGET}: {message}")
        self.turn_id = turn_id
        self.agent = agent


def new_session_id(now: datetime | None = None) -> str:
    """``heist_YYYYMMDD_HHMMSS_<16 hex>`` (UTC): sortable, and 64 random bits so nobody guesses a live one."""
    moment = now or datetime.now(UTC)
    return f"heist_{moment:%Y%m%d_%H%M%S}_{secrets.token_hex(8)}"


@dataclass(frozen=True)
class RunOptions:
    """Per-run choices that are not configuration (mostly CLI flags)."""

    session_id: str | None = None
    turns: int | None = None
    seed: int | None = None
    require_healthy: bool = False
    export_dir: Path | None = None
    export: bool = True


@dataclass
class SessionResult:
    """What a session did, for the summary and for tests and benchmarks."""

    session_id: str
    status: str
    exit_code: int
    health: list[HealthResult] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    database: str = ""
    exports: list[Path] = field(default_factory=list)
    """The JSON and Markdown logs that were written (whole)."""
    report: Path | None = None
    """The session's HTML report (``orchestrator report``), written beside the exports."""
    export_failures: dict[Path, str] = field(default_factory=dict)
    """Session files that could not be written, and why (nothing is left at their path)."""
    error: str | None = None
    turns_before: int = 0
    """A resumed session's turns from earlier runs (``turns`` holds this run's only)."""
    unusable: list[UnusableService] = field(default_factory=list)
    """Why a session ended ``degraded`` (``unusable_services``); empty otherwise."""
    settled: list[str] = field(default_factory=list)
    """Earlier sessions whose end the database had missed, recorded when this run opened it."""
    tokens: TokenTotals = field(default_factory=TokenTotals)
    """LLM tokens of the whole session, per agent: a resumed session's earlier turns included (as audited)."""

    @property
    def tool_calls_ok(self) -> int:
        """Tool calls that returned a result."""
        return sum(1 for turn in self.turns for row in turn.tool_usage if row.success)

    @property
    def tool_calls_failed(self) -> int:
        """Tool calls that failed or were refused."""
        return sum(1 for turn in self.turns for row in turn.tool_usage if not row.success)

    @property
    def errors(self) -> int:
        """Errors recorded during turns: failed calls and LLM requests, empty replies (health results not counted)."""
        return sum(1 for turn in self.turns for event in turn.events if event.status_code != "OK")

    @property
    def empty_turns(self) -> int:
        """Turns whose reply stayed empty (status ``empty``; each is one of ``errors`` too)."""
        return sum(1 for turn in self.turns if turn.status == EMPTY)

    @property
    def degraded_services(self) -> list[str]:
        """Services that were not SERVING at start."""
        return [result.service for result in self.health if not result.ok]


class SessionRunner:
    """Runs one session on shared clients (open them once, run many sessions)."""

    def __init__(
        self,
        config: HeistConfig,
        clients: ServiceClients,
        llm: LLMClient,
        audit: AuditStore,
        options: RunOptions | None = None,
        *,
        on_health: Callable[[list[HealthResult]], None] | None = None,
        on_turn: TurnObserver | None = None,
        on_progress: TurnProgress | None = None,
        resume: ResumePoint | None = None,
        approval_hooks: ApprovalHooks | None = None,
        client_id: str | None = None,
    ) -> None:
        self.config = config
        self.client_id = client_id
        """The OAuth client that started the session through ``orchestrator serve`` (None: the CLI)."""
        self._cancel_reason: str | None = None
        self._recorded = False
        self.options = options or RunOptions()
        self.resume_point = resume
        """Set when continuing a session from the audit (``resume_session``); it is already claimed."""
        self.turns = self.options.turns or config.session.max_turns
        # A seed is always recorded, so a resumed random schedule continues exactly as it would have.
        self.seed = self.options.seed if self.options.seed is not None else secrets.randbelow(SEED_LIMIT)
        self.session_id = self.options.session_id or new_session_id()
        if not SESSION_ID_PATTERN.match(self.session_id):
            raise ValueError(f"invalid session ID {self.session_id!r} (letters, digits, '_', '.', '-'; max 128)")
        self.context = SessionContext(
            self.session_id, config, clients, llm, audit, approval_hooks, progress=on_progress
        )
        self._leftovers: list[dict[str, Any]] = []
        """Tool calls of the turn a dead process left (a resume finishes them in that turn)."""
        self.agents = {agent.name: CrewAgent(agent, self.context) for agent in config.agents}
        self._on_health = on_health
        self._on_turn = on_turn

    def cancel(self, reason: str) -> None:
        """Make the cancellation that follows end the session ``cancelled`` (audited with ``reason``), not interrupted.

        The caller then cancels the task running ``run``: the current turn stops
        where it is, like a Ctrl-C, and no turn is half-written.
        """
        self._cancel_reason = reason

    async def record(self) -> None:
        """Create the session's row (once; a resumed session has its own already): AuditError if it cannot.

        ``run`` does it after the health checks; a service calls it first, so a
        task it has announced is in the audit.
        """
        if self.resume_point is not None or self._recorded:
            return
        await self.context.audit.create_session(
            self.session_id,
            strategy=self.config.session.strategy,
            seed=self.seed,
            model=self.config.llm.model,
            turns_planned=self.turns,
            client_id=self.client_id,
            objective=self.config.session.objective,
        )
        self._recorded = True

    async def run(self) -> SessionResult:
        """Play the session; a Ctrl-C (cancellation) marks it interrupted (``cancel``: cancelled) and re-raises."""
        context = self.context
        audit = context.audit
        result = SessionResult(self.session_id, SessionStatus.ACTIVE, ExitCode.OK, database=audit.location)
        result.health = await check_health(context.clients, context.llm, self.config.resilience.health_timeout_s)
        if self._on_health is not None:
            self._on_health(result.health)
        try:
            await self.record()
            await audit.add_events(self.session_id, [health.to_event() for health in result.health])
        except AuditError as exc:
            return self._failed(result, str(exc))

        llm_health = next((health for health in result.health if health.service == "llm"), None)
        if llm_health is not None and not llm_health.ok:
            # Every turn would only wait for the same failure; say so now instead.
            return await self._finish(result, SessionStatus.FAILED, ExitCode.FAILED, self._llm_down(llm_health.detail))
        if self.options.require_healthy and result.degraded_services:
            message = f"required services unhealthy: {', '.join(result.degraded_services)}"
            return await self._finish(result, SessionStatus.FAILED, ExitCode.UNHEALTHY, message)
        try:
            await self._play(result)
        except AuditError as exc:
            return await self._finish(result, SessionStatus.FAILED, ExitCode.FAILED, str(exc))
        except LLMBroken as exc:
            return await self._finish(result, SessionStatus.FAILED, ExitCode.FAILED, self._llm_down(str(exc)))
        except BudgetExceeded as exc:
            return await self._over_budget(result, exc)
        except (asyncio.CancelledError, KeyboardInterrupt):
            await asyncio.shield(self._stopped(result))
            raise
        answered_before = self.resume_point.answered_before if self.resume_point is not None else 0
        if not answered_before and not any(turn.status == OK for turn in result.turns):
            # A session in which the model never spoke did not happen, whatever else worked.
            reason = self._llm_down("no turn was answered")
            return await self._finish(result, SessionStatus.FAILED, ExitCode.FAILED, reason)
        result.unusable = unusable_services(result.turns, list(self.config.crew_services))
        if result.unusable:
            reason = "; ".join(service.describe() for service in result.unusable)
            return await self._finish(result, SessionStatus.DEGRADED, ExitCode.DEGRADED, reason)
        return await self._finish(result, SessionStatus.COMPLETED, ExitCode.OK, None)

    async def _stopped(self, result: SessionResult) -> None:
        """End a session stopped mid-turn: ``cancelled`` when asked to (``cancel``), else ``interrupted``."""
        reason = self._cancel_reason
        if reason is None:
            await self._finish(result, SessionStatus.INTERRUPTED, ExitCode.INTERRUPTED, "interrupted")
            return
        cancel = EventRow("orchestrator", "cancel", "CANCELLED", reason)
        # If this fails, the status below still says it (or the session stays active, resumable as stale).
        with contextlib.suppress(AuditError):
            await self.context.audit.add_events(self.session_id, [cancel])
        await self._finish(result, SessionStatus.CANCELLED, ExitCode.INTERRUPTED, reason)

    def _llm_down(self, reason: str) -> str:
        """Explain an LLM failure, pointing at the embedded model's log when we run it."""
        message = f"the LLM at {self.config.llm.base_url} cannot answer: {reason}"
        if self.config.llm.embedded:
            message += f" (embedded model: see {self.config.mesh.log_dir / 'llm.log'}; 'make status')"
        return message

    async def _play(self, result: SessionResult) -> None:
        session_config = self.config.session
        schedule = iter_schedule(session_config.strategy, self.config.turn_order, self.turns, self.seed)
        history = await self._pick_up(result) if self.resume_point is not None else []
        for _ in history:  # the turns played before the session was resumed
            next(schedule, None)
        self._check_budget(result.tokens, None, None)  # a resumed session may have spent it all already
        following = next(schedule, None)
        prefetched: asyncio.Task[MemoryFetch] | None = None
        failures_allowed = self.config.resilience.llm_max_consecutive_failures
        failed_in_a_row = 0
        try:
            for index in itertools.count(len(history)):
                if following is None:
                    break
                name, following = following, next(schedule, None)
                agent = self.agents[name]
                # The turn's trace is opened here, so its memory calls (this speaker's, and the prefetch
                # for the next one, which runs during this turn) belong to it and not to traces of their own.
                with turn_scope(self.context.clients.tracer, self.session_id, name, index + 1):
                    memory = prefetched if prefetched is not None else asyncio.ensure_future(agent.fetch_memory())
                    # The next speaker's memory cannot change during this turn unless it is the same agent.
                    prefetched = (
                        asyncio.ensure_future(self.agents[following].fetch_memory())
                        if following is not None and following != name
                        else None
                    )
                    leftovers = [call for call in self._leftovers if call["agent_name"] == name]
                    self._leftovers = []
                    turn = await agent.take_turn(index + 1, history, memory, leftovers)
                history.append(turn.as_message())
                result.turns.append(turn)
                if turn.llm_requests:
                    result.tokens.add(name, turn.prompt_tokens, turn.completion_tokens, turn.tokens_estimated)
                if self._on_turn is not None:
                    self._on_turn(turn)
                self._check_budget(result.tokens, turn.turn_id, name)
                failed_in_a_row = failed_in_a_row + 1 if turn.status in (LLM_ERROR, EMPTY) else 0
                if failed_in_a_row >= failures_allowed:
                    last = "an empty reply" if turn.status == EMPTY else turn.message
                    raise LLMBroken(f"{failed_in_a_row} turns in a row failed (last: {last})")
        finally:
            if prefetched is not None and not prefetched.done():
                prefetched.cancel()

    async def _pick_up(self, result: SessionResult) -> list[ConversationMessage]:
        """Continue a resumed session: its conversation from the audit, memory rebuilt from it, a ``resume`` event."""
        assert self.resume_point is not None
        point = self.resume_point
        sync = self.context.memory_sync
        for message in point.history:
            sync.record_written(message.agent_name)
        for name, agent in self.agents.items():
            agent.continue_after(sync.per_agent.get(name, 0))
        events = [EventRow("orchestrator", "resume", "OK", point.describe())]
        # The memory service may have lost the session (restarted), or hold a turn the audit never got.
        events += await sync.rebuild(fresh=True)
        await self.context.audit.add_events(self.session_id, events)
        self._leftovers = await self.context.audit.unsettled_tool_calls(self.session_id, point.turns_done)
        result.turns_before = point.turns_done
        result.tokens = await self.context.audit.token_totals(self.session_id)
        return list(point.history)

    def _check_budget(self, tokens: TokenTotals, turn_id: int | None, agent: str | None) -> None:
        """Raise BudgetExceeded when the session or an agent (``agent``, or all of them) is over its limit."""
        limit = self.config.session.max_llm_tokens
        used = tokens.session
        after = f" after turn {turn_id} ({agent})" if turn_id is not None else ""
        if limit is not None and used.total > limit:
            raise BudgetExceeded(
                f"the session used {used.describe()} LLM tokens{after}, over session.max_llm_tokens = {limit}",
                turn_id,
                agent,
            )
        for name, crew_agent in self.agents.items():
            agent_limit = crew_agent.config.max_llm_tokens
            if agent_limit is None or (agent is not None and name != agent):
                continue
            spent = tokens.agent(name)
            if spent.total > agent_limit:
                raise BudgetExceeded(
                    f"{name} used {spent.describe()} LLM tokens{after}, over its max_llm_tokens = {agent_limit}",
                    turn_id,
                    name,
                )

    async def _over_budget(self, result: SessionResult, exc: BudgetExceeded) -> SessionResult:
        """End the session ``failed`` for its budget: an event says so, then the usual end (exit 1)."""
        event = EventRow("orchestrator", BUDGET, "BUDGET_EXCEEDED", str(exc), None, exc.turn_id, exc.agent)
        try:
            await self.context.audit.add_events(self.session_id, [event])
        except AuditError as error:
            return await self._finish(result, SessionStatus.FAILED, ExitCode.FAILED, f"{exc}; {error}")
        return await self._finish(result, SessionStatus.FAILED, ExitCode.FAILED, str(exc))

    async def _finish(self, result: SessionResult, status: str, exit_code: int, error: str | None) -> SessionResult:
        result.status, result.exit_code, result.error = status, exit_code, error
        try:
            await self.context.audit.finish_session(self.session_id, status, error)
        except SessionTakenOverError as exc:
            return self._failed(result, f"{error}; {exc}" if error else str(exc))
        except AuditError as exc:
            return self._failed(result, self._keep_end(status, error, exc))
        if self.options.export and status not in (SessionStatus.INTERRUPTED, SessionStatus.CANCELLED):
            out_dir = self.options.export_dir or self.config.sessions_dir
            failure: str | None = None
            try:
                files = await asyncio.get_running_loop().run_in_executor(None, self._write_files, out_dir)
            except AuditError as exc:
                files = SessionFiles()
                failure = f"export failed: cannot read the session back from the audit: {exc}"
            else:
                if files.failed:
                    failure = f"export failed: {files.describe_failures()}"
            result.exports = [path for path in files.written if path.suffix != ".html"]
            result.report = next((path for path in files.written if path.suffix == ".html"), None)
            result.export_failures = files.failed
            if failure is not None:
                # The session itself is recorded as it ended; the run still failed to leave its logs.
                result.error = f"{result.error + '; ' if result.error else ''}{failure}"
                result.exit_code = result.exit_code or ExitCode.FAILED
        return result

    def _write_files(self, out_dir: Path) -> SessionFiles:
        return write_session_files(self.context.audit.read_session_log(self.session_id), out_dir)

    def _keep_end(self, status: str, error: str | None, exc: AuditError) -> str:
        """Keep the end the database missed for the next run or resume; return the error saying so."""
        ended = "" if status == SessionStatus.FAILED else f" ({status})"
        message = f"{error + '; ' if error else ''}the session's end{ended} could not be recorded: {exc}"
        try:
            kept = record_later(
                unrecorded_dir(self.config.mesh.run_dir), self.context.audit, self.session_id, SessionStatus.FAILED,
                message,
            )  # fmt: skip
        except OSError as file_error:
            return (
                f"{message}; nor kept for later ({file_error.strerror or file_error}): the session stays active "
                "until 'orchestrator resume' takes it over as stale"
            )
        return f"{message}; kept in {kept}, recorded as failed by the next 'orchestrator run' or 'resume' on it"

    @staticmethod
    def _failed(result: SessionResult, error: str) -> SessionResult:
        result.status, result.exit_code, result.error = SessionStatus.FAILED, ExitCode.FAILED, error
        return result


async def run_session(
    config: HeistConfig,
    options: RunOptions | None = None,
    *,
    on_health: Callable[[list[HealthResult]], None] | None = None,
    on_turn: TurnObserver | None = None,
    on_progress: TurnProgress | None = None,
    approval_hooks: ApprovalHooks | None = None,
) -> SessionResult:
    """Open the audit store, channels and LLM client, run one new session, close everything.

    Raises AuditError if the audit database cannot be opened at all.
    """
    return await _open_and_run(
        config, options, None, on_health=on_health, on_turn=on_turn, on_progress=on_progress,
        approval_hooks=approval_hooks,
    )  # fmt: skip


async def resume_session(
    config: HeistConfig,
    session_id: str,
    options: RunOptions | None = None,
    *,
    on_resume: Callable[[ResumePoint], None] | None = None,
    on_health: Callable[[list[HealthResult]], None] | None = None,
    on_turn: TurnObserver | None = None,
    on_progress: TurnProgress | None = None,
    approval_hooks: ApprovalHooks | None = None,
) -> SessionResult:
    """Continue an interrupted, failed or stale session from the audit alone (``orchestrator.session.resume``).

    The session keeps its ID, strategy, seed and planned turns; the turns in
    the audit are not played again. Raises AuditError if the database cannot be
    opened or read, UnknownSessionError, and NotResumableError or
    ResumeConflictError (nothing was changed then).
    """
    return await _open_and_run(
        config, options, session_id, on_resume=on_resume, on_health=on_health, on_turn=on_turn,
        on_progress=on_progress, approval_hooks=approval_hooks,
    )  # fmt: skip


@dataclass
class SessionResources:
    """What sessions share: the audit store, the mesh's channels, the LLM client, tracing.

    Why separate from running a session: ``orchestrator run`` opens them for its
    one session, ``orchestrator serve`` once for every session it hosts (one
    connection pool, one writer thread, one set of channels).
    """

    audit: AuditStore
    clients: ServiceClients
    llm: LLMClient
    telemetry: Telemetry
    meters: MeterProvider | None
    """Exports the LLM token counts over OTLP, when an endpoint is configured."""
    settled: list[str] = field(default_factory=list)
    """Earlier sessions whose end the database had missed, recorded when the audit was opened."""

    @classmethod
    def connect(cls, config: HeistConfig, audit: AuditStore, settled: list[str] | None = None) -> SessionResources:
        """Open the channels and the LLM client beside an open audit store (in the running event loop)."""
        telemetry = setup_tracing(ORCHESTRATOR_SERVICE_NAME)
        meters = setup_metrics(ORCHESTRATOR_SERVICE_NAME)
        clients = ServiceClients(config, tracer=telemetry.tracer)
        llm = LLMClient(config.llm, meter=meters.get_meter("heist-mesh") if meters is not None else None)
        return cls(audit, clients, llm, telemetry, meters, list(settled or ()))

    @classmethod
    async def open(cls, config: HeistConfig) -> SessionResources:
        """Open the audit (recording ends it had missed), then everything else; AuditError if it cannot be opened."""
        audit = AuditStore.open(config.database.url)
        try:
            settled = await settle_unrecorded(audit, unrecorded_dir(config.mesh.run_dir))
        except BaseException:
            await asyncio.get_running_loop().run_in_executor(None, audit.close)
            raise
        return cls.connect(config, audit, settled)

    async def close(self) -> None:
        """Close the channels, the LLM client and the audit (queued writes first), and export the last spans."""
        await _close(self.clients, self.llm, self.audit, self.telemetry, self.meters)


async def _open_and_run(
    config: HeistConfig,
    options: RunOptions | None,
    resume_id: str | None,
    *,
    on_resume: Callable[[ResumePoint], None] | None = None,
    on_health: Callable[[list[HealthResult]], None] | None = None,
    on_turn: TurnObserver | None = None,
    on_progress: TurnProgress | None = None,
    approval_hooks: ApprovalHooks | None = None,
) -> SessionResult:
    """Open everything, run the session (new or resumed: one path for both), close everything."""
    audit = AuditStore.open(config.database.url)
    point: ResumePoint | None = None
    try:
        # Before anything else: a resume of such a session then sees how it really ended.
        settled = await settle_unrecorded(audit, unrecorded_dir(config.mesh.run_dir))
        if resume_id is not None:
            point = await prepare_resume(audit, config, resume_id)
    except BaseException:
        await asyncio.get_running_loop().run_in_executor(None, audit.close)
        raise
    if point is not None:
        if on_resume is not None:
            on_resume(point)
        config, options = resumed_config(config, options, point)
    resources = SessionResources.connect(config, audit, settled)
    try:
        runner = SessionRunner(
            config, resources.clients, resources.llm, audit, options, on_health=on_health, on_turn=on_turn,
            on_progress=on_progress, resume=point, approval_hooks=approval_hooks,
        )  # fmt: skip
        result = await runner.run()
        result.settled = settled
        return result
    finally:
        await asyncio.shield(resources.close())


def resumed_config(
    config: HeistConfig, options: RunOptions | None, point: ResumePoint
) -> tuple[HeistConfig, RunOptions]:
    """Give a resumed session its own strategy, seed, length and objective, whatever the config or flags say today."""
    update: dict[str, object] = {"strategy": point.strategy}
    if point.objective is not None:
        update["objective"] = point.objective
    config = config.with_overrides(session=config.session.model_copy(update=update))
    given = options or RunOptions()
    return config, RunOptions(
        session_id=point.session_id,
        turns=point.turns_planned,
        seed=point.seed,
        require_healthy=given.require_healthy,
        export_dir=given.export_dir,
        export=given.export,
    )


async def _close(
    clients: ServiceClients, llm: LLMClient, audit: AuditStore, telemetry: Telemetry, meters: MeterProvider | None
) -> None:
    await clients.close()
    await llm.close()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, audit.close)
    await loop.run_in_executor(None, telemetry.shutdown)  # the last spans are exported before the process ends
    if meters is not None:
        await loop.run_in_executor(None, meters.shutdown)  # ... and the last token counts


def health_events(results: list[HealthResult]) -> list[EventRow]:
    """Health results as ``events`` rows."""
    return [result.to_event() for result in results]
