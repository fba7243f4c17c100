"""Typed, validated view of the orchestrator's sections of ``config/heist.yaml``.

The servers' sections (mesh, services, oauth, limits) are read by
``servers.settings`` so both sides agree on addresses and deadlines; this module
adds agents, llm, session, database and resilience. Everything is checked on
load (unknown keys, wrong types, unknown tools, turn order vs. crew) because a
mistake found after the first LLM call wastes a whole run.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from servers.settings import REPO_ROOT, ConfigError, ConfigSection, MeshSettings, load_mesh_settings

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "AgentConfig",
    "CircuitBreakerConfig",
    "ConfigError",
    "DatabaseConfig",
    "GrpcRetryConfig",
    "HeistConfig",
    "LLMConfig",
    "MemoryContextConfig",
    "ResilienceConfig",
    "SessionConfig",
    "default_config_path",
    "load_config",
]

DEFAULT_CONFIG_PATH = Path("config/heist.yaml")
CONFIG_PATH_ENV = "HEIST_CONFIG"
TOOL_NAMES: tuple[str, ...] = ("calculator", "file_reader", "database_query")
"""Services an agent may use as tools (each a gRPC service with tool methods)."""

TOP_LEVEL_KEYS = frozenset(
    {"mesh", "services", "oauth", "limits", "agents", "llm", "session", "database", "resilience"}
)
ToolCallingMode = Literal["native", "inline", "auto"]
PromptStyle = Literal["chat", "transcript"]
"""chat: system/user messages to /chat/completions (instruction-tuned models).
transcript: the meeting as a plain-text transcript to /completions, which the
model continues with the speaker's next line (small base models such as the
embedded Gemma 3 270M, which have no chat template)."""
TurnStrategyName = Literal["round_robin", "random"]
PLACEHOLDER_API_KEY = "not-needed"


@dataclass(frozen=True)
class AgentConfig:
    """One crew member: who it is, what it may use, and which OAuth client it is."""

    name: str
    role: str
    system_prompt: str
    tools: tuple[str, ...] = ()
    oauth_client: str = ""
    scopes: tuple[str, ...] = ()
    is_saboteur: bool = False


@dataclass(frozen=True)
class LLMConfig:
    """The OpenAI-compatible endpoint and how to talk to it."""

    embedded: bool = True
    base_url: str = "http://127.0.0.1:1234/v1"
    model: str = "gemma-3-270m"
    api_key_env: str = "HEIST_LLM_API_KEY"
    temperature: float = 0.7
    max_tokens: int = 256
    timeout_s: float = 60.0
    health_timeout_s: float = 10.0
    """Deadline of the one-token health probe (a cold model's first token takes a while)."""
    max_retries: int = 1
    tool_calling: ToolCallingMode = "inline"
    prompt_style: PromptStyle = "chat"
    prefill_tool_every: int = 0
    max_tool_rounds: int = 2
    repeat_penalty: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def api_key(self) -> str:
        """The key from ``api_key_env``; local servers ignore it, so a placeholder stands in."""
        return os.environ.get(self.api_key_env) or PLACEHOLDER_API_KEY

    @property
    def extra_body(self) -> dict[str, object]:
        """Sampling extras that not every server knows, sent outside the typed OpenAI parameters."""
        extras: dict[str, object] = {}
        if self.repeat_penalty is not None:
            extras["repeat_penalty"] = self.repeat_penalty
        if self.top_p is not None:
            extras["top_p"] = self.top_p
        if self.top_k is not None:
            extras["top_k"] = self.top_k
        if self.stop:
            extras["stop"] = list(self.stop)
        return extras


@dataclass(frozen=True)
class MemoryContextConfig:
    """How much of an agent's own memory goes back into its prompt."""

    recent_count: int = 5
    max_chars: int = 100


@dataclass(frozen=True)
class SessionConfig:
    """Shape of one heist conversation."""

    max_turns: int = 8
    turn_order: tuple[str, ...] = ("planner", "hacker", "safecracker", "mole")
    strategy: TurnStrategyName = "round_robin"
    context_messages: int = 5
    objective: str = "Plan the First Meridian Bank vault job. Share what you know and propose the next step."
    tool_result_max_chars: int = 1500
    memory: MemoryContextConfig = field(default_factory=MemoryContextConfig)


@dataclass(frozen=True)
class DatabaseConfig:
    """Where the audit trail lives (a ``playhouse.db_url`` URL)."""

    url: str


@dataclass(frozen=True)
class GrpcRetryConfig:
    """gRPC's built-in retryPolicy for UNAVAILABLE (applied through the channel's service config)."""

    max_attempts: int = 3
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 0.5
    backoff_multiplier: float = 2.0


@dataclass(frozen=True)
class CircuitBreakerConfig:
    """When a service is considered down and how long to leave it alone."""

    failure_threshold: int = 3
    reset_timeout_s: float = 10.0


@dataclass(frozen=True)
class ResilienceConfig:
    """Retry and circuit-breaker numbers, plus the health-check deadline."""

    grpc_retry: GrpcRetryConfig = field(default_factory=GrpcRetryConfig)
    circuit_breaker: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    health_timeout_s: float = 1.0
    llm_max_consecutive_failures: int = 3
    """The LLM's circuit breaker: this many failed turns in a row end the session as failed."""


@dataclass(frozen=True)
class HeistConfig:
    """The whole configuration: the servers' view plus the orchestrator's sections."""

    mesh: MeshSettings
    agents: tuple[AgentConfig, ...]
    llm: LLMConfig
    session: SessionConfig
    database: DatabaseConfig
    resilience: ResilienceConfig

    @property
    def agents_by_name(self) -> dict[str, AgentConfig]:
        """Agents keyed by name, in configured order."""
        return {agent.name: agent for agent in self.agents}

    @property
    def sessions_dir(self) -> Path:
        """Default folder for exported session logs."""
        return self.mesh.run_dir / "sessions"

    def with_service_address(self, service: str, address: str) -> HeistConfig:
        """Return a copy with one service moved (tests run servers on ephemeral ports)."""
        return dataclasses.replace(self, mesh=self.mesh.with_address(service, address))

    def with_overrides(self, **sections: Any) -> HeistConfig:
        """Return a copy with whole sections replaced, e.g. ``llm=replace(cfg.llm, model=...)``."""
        return dataclasses.replace(self, **sections)


DEFAULT_AGENTS: tuple[AgentConfig, ...] = (
    AgentConfig(
        name="planner",
        role="Mastermind",
        system_prompt="You are the planner of a bank heist crew. Coordinate the crew, set the plan, keep it short.",
        oauth_client="planner",
        scopes=("simulation:read",),
    ),
    AgentConfig(
        name="hacker",
        role="Hacker",
        system_prompt="You are the crew's hacker. Read the intelligence documents and explain the security systems.",
        tools=("file_reader",),
        oauth_client="hacker",
    ),
    AgentConfig(
        name="safecracker",
        role="Safecracker",
        system_prompt="You are the crew's safecracker. Work out timings and numbers with the calculator.",
        tools=("calculator",),
        oauth_client="safecracker",
    ),
    AgentConfig(
        name="mole",
        role="Inside Man",
        system_prompt="You are the crew's inside man at the bank. Query the bank database for guards and shifts.",
        tools=("database_query",),
        oauth_client="mole",
        is_saboteur=True,
    ),
)


def default_config_path() -> Path:
    """``$HEIST_CONFIG`` if set, else ``config/heist.yaml`` relative to the working directory."""
    return Path(os.environ.get(CONFIG_PATH_ENV) or DEFAULT_CONFIG_PATH)


def _read_agents(root: ConfigSection) -> tuple[AgentConfig, ...]:
    raw = root.data.get("agents")
    if raw is None:
        return DEFAULT_AGENTS
    if not isinstance(raw, list) or not raw:
        raise root.error("expected a non-empty list of agents", "agents")
    agents: list[AgentConfig] = []
    for index, item in enumerate(raw):
        node = ConfigSection(item, f"agents[{index}]", root.source)
        node.only("name", "role", "system_prompt", "tools", "oauth_client", "scopes", "is_saboteur")
        name = node.string("name")
        tools = node.strings("tools", ())
        for tool in tools:
            if tool not in TOOL_NAMES:
                raise node.error(f"unknown tool {tool!r} (known: {', '.join(TOOL_NAMES)})", "tools")
        agents.append(
            AgentConfig(
                name=name,
                role=node.string("role"),
                system_prompt=node.string("system_prompt"),
                tools=tools,
                oauth_client=node.string("oauth_client", name),
                scopes=node.strings("scopes", ()),
                is_saboteur=node.flag("is_saboteur", False),
            )
        )
    names = [agent.name for agent in agents]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise root.error(f"duplicate agent names: {', '.join(duplicates)}", "agents")
    return tuple(agents)


def _read_llm(node: ConfigSection) -> LLMConfig:
    d = LLMConfig()
    node.only(*(f.name for f in dataclasses.fields(LLMConfig)))
    mode = node.choice("tool_calling", d.tool_calling, ("native", "inline", "auto"))
    style = node.choice("prompt_style", d.prompt_style, ("chat", "transcript"))
    if style == "transcript" and mode == "native":
        raise node.error("native function calling needs prompt_style: chat (transcript uses markers)", "tool_calling")
    top_k = node.integer("top_k", 1) if "top_k" in node.data else None
    return LLMConfig(
        embedded=node.flag("embedded", d.embedded),
        base_url=node.string("base_url", d.base_url).rstrip("/"),
        model=node.string("model", d.model),
        api_key_env=node.string("api_key_env", d.api_key_env),
        temperature=node.number("temperature", d.temperature, allow_zero=True),
        max_tokens=node.integer("max_tokens", d.max_tokens),
        timeout_s=node.number("timeout_s", d.timeout_s),
        health_timeout_s=node.number("health_timeout_s", d.health_timeout_s),
        max_retries=node.integer("max_retries", d.max_retries, minimum=0),
        tool_calling=mode,  # type: ignore[arg-type]  # checked by choice()
        prompt_style=style,  # type: ignore[arg-type]  # checked by choice()
        prefill_tool_every=node.integer("prefill_tool_every", d.prefill_tool_every, minimum=0),
        max_tool_rounds=node.integer("max_tool_rounds", d.max_tool_rounds),
        repeat_penalty=node.optional_number("repeat_penalty"),
        top_p=node.optional_number("top_p"),
        top_k=top_k,
        stop=node.strings("stop", ()),
    )


def _read_session(node: ConfigSection, agents: tuple[AgentConfig, ...]) -> SessionConfig:
    d = SessionConfig()
    node.only(*(f.name for f in dataclasses.fields(SessionConfig)))
    memory = node.child("memory")
    memory.only("recent_count", "max_chars")
    names = [agent.name for agent in agents]
    turn_order = node.strings("turn_order", tuple(names))
    unknown = [name for name in turn_order if name not in names]
    if unknown:
        raise node.error(f"names unknown agents: {', '.join(unknown)} (crew: {', '.join(names)})", "turn_order")
    missing = [name for name in names if name not in turn_order]
    if missing:
        raise node.error(f"is missing agents: {', '.join(missing)}", "turn_order")
    if len(set(turn_order)) != len(turn_order):
        raise node.error("lists an agent more than once", "turn_order")
    return SessionConfig(
        max_turns=node.integer("max_turns", d.max_turns),
        turn_order=turn_order,
        strategy=node.choice("strategy", d.strategy, ("round_robin", "random")),  # type: ignore[arg-type]
        context_messages=node.integer("context_messages", d.context_messages, minimum=0),
        objective=node.string("objective", d.objective),
        tool_result_max_chars=node.integer("tool_result_max_chars", d.tool_result_max_chars),
        memory=MemoryContextConfig(
            recent_count=memory.integer("recent_count", d.memory.recent_count),
            max_chars=memory.integer("max_chars", d.memory.max_chars),
        ),
    )


def resolve_database_url(url: str | None, run_dir: Path) -> str:
    """Default to ``<run_dir>/audit/heist.db``; anchor a relative SQLite path at the repository root."""
    if url is None:
        return f"sqlite:///{run_dir / 'audit' / 'heist.db'}"
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix + ":memory:":
        return prefix + str(REPO_ROOT / url[len(prefix) :])
    return url


def _read_database(node: ConfigSection, run_dir: Path) -> DatabaseConfig:
    node.only("url")
    return DatabaseConfig(url=resolve_database_url(node.string("url") if "url" in node.data else None, run_dir))


def _read_resilience(node: ConfigSection) -> ResilienceConfig:
    node.only("grpc_retry", "circuit_breaker", "health_timeout_s", "llm_max_consecutive_failures")
    retry, breaker = node.child("grpc_retry"), node.child("circuit_breaker")
    retry.only(*(f.name for f in dataclasses.fields(GrpcRetryConfig)))
    breaker.only(*(f.name for f in dataclasses.fields(CircuitBreakerConfig)))
    r, b = GrpcRetryConfig(), CircuitBreakerConfig()
    max_attempts = retry.integer("max_attempts", r.max_attempts, minimum=2)
    if max_attempts > 5:  # gRPC silently caps at 5; say so instead of pretending
        raise retry.error(f"gRPC allows at most 5 attempts, got {max_attempts}", "max_attempts")
    return ResilienceConfig(
        grpc_retry=GrpcRetryConfig(
            max_attempts=max_attempts,
            initial_backoff_s=retry.number("initial_backoff_s", r.initial_backoff_s),
            max_backoff_s=retry.number("max_backoff_s", r.max_backoff_s),
            backoff_multiplier=retry.number("backoff_multiplier", r.backoff_multiplier),
        ),
        circuit_breaker=CircuitBreakerConfig(
            failure_threshold=breaker.integer("failure_threshold", b.failure_threshold),
            reset_timeout_s=breaker.number("reset_timeout_s", b.reset_timeout_s),
        ),
        health_timeout_s=node.number("health_timeout_s", 1.0),
        llm_max_consecutive_failures=node.integer(
            "llm_max_consecutive_failures", ResilienceConfig.llm_max_consecutive_failures
        ),
    )


def _check_oauth_clients(agents: tuple[AgentConfig, ...], clients: Mapping[str, tuple[str, ...]], source: str) -> None:
    for index, agent in enumerate(agents):
        if agent.tools and agent.oauth_client not in clients:
            raise ConfigError(
                f"{source}: agents[{index}].oauth_client: {agent.oauth_client!r} is not in oauth.clients "
                f"(known: {', '.join(sorted(clients))})"
            )


def load_config(path: str | Path | None = None) -> HeistConfig:
    """Read and validate the whole config file; raise ``ConfigError`` naming key and file."""
    config_path = Path(path) if path is not None else default_config_path()
    mesh = load_mesh_settings(config_path)  # also reports unreadable files and bad YAML
    source = str(config_path)
    raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    root = ConfigSection(raw, "", source)
    root.only(*TOP_LEVEL_KEYS)
    agents = _read_agents(root)
    _check_oauth_clients(agents, mesh.oauth.clients, source)
    return HeistConfig(
        mesh=mesh,
        agents=agents,
        llm=_read_llm(root.child("llm")),
        session=_read_session(root.child("session"), agents),
        database=_read_database(root.child("database"), mesh.run_dir),
        resilience=_read_resilience(root.child("resilience")),
    )
