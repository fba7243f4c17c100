"""What every agent of one session shares: its ID, the clients, the model, the audit and the memory bookkeeping."""

from __future__ import annotations

from heist_common.audit import AuditStore
from heist_common.config import HeistConfig
from orchestrator.llm.client import LLMClient, LLMError
from orchestrator.mesh.clients import ServiceClients, session_metadata
from orchestrator.mesh.memory_sync import MemorySync
from orchestrator.turn.approval import ApprovalGate, ApprovalHooks
from orchestrator.turn.constrained_tools import ConstrainedTools, Dialect
from orchestrator.turn.progress import Phase, PhaseChange, TurnProgress
from orchestrator.turn.turn import Turn

__all__ = ["SessionContext"]


class SessionContext:
    """What every agent of one session shares: IDs, clients and the memory bookkeeping."""

    def __init__(
        self,
        session_id: str,
        config: HeistConfig,
        clients: ServiceClients,
        llm: LLMClient,
        audit: AuditStore,
        approval_hooks: ApprovalHooks | None = None,
        *,
        progress: TurnProgress | None = None,
    ) -> None:
        self.session_id = session_id
        self.progress = progress
        self.config = config
        self.clients = clients
        self.llm = llm
        self.audit = audit
        self.metadata = session_metadata(session_id)
        self.approvals = ApprovalGate(audit, session_id, config.session.approval_timeout_s, approval_hooks)
        self.memory_sync = MemorySync(clients, audit, session_id, self.metadata)
        # Grammars sized to a turn's max_tokens, so that a constrained argument always fits one request.
        self.constrained = ConstrainedTools(
            config.llm.constrained_tools, clients.registry, max_bytes=config.llm.max_tokens
        )

    def progress_at(self, turn: Turn, phase: Phase, detail: str = "") -> None:
        """Tell the session's progress observer, if any, that ``turn`` entered ``phase``."""
        if self.progress is not None:
            change = PhaseChange(
                self.session_id, turn.turn_id, turn.agent_name, turn.agent_role, phase, turn.started, detail
            )
            self.progress(change)

    def fall_back(self, dialect: Dialect, exc: LLMError, turn: Turn) -> None:
        """Drop a dialect the server rejected (audited once), counting the request; re-raise any other error."""
        event = self.constrained.fall_back(dialect, exc, turn.turn_id, turn.agent_name)
        turn.llm_ms += exc.latency_ms
        if event is not None:
            turn.events.append(event)
