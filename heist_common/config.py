"""The one configuration file, declared once as pydantic models and read once.

Both halves of the mesh read the same file through these models: the servers
need ``mesh``, ``services`` and ``oauth``; the orchestrator reads all of it.
Every mapping forbids unknown keys, so a typo fails loudly with the key path and
the file instead of being ignored. A service's own ``limits`` mapping is left
opaque here and validated by that service's ``Limits`` model when it starts
(``make serve`` checks them all first), so each service owns its bounds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from heist_common.layout import IN_CHECKOUT, REPO_ROOT, RunFolder, anchored, shipped_config_path

__all__ = [
    "CONFIG_PATH_ENV",
    "DEFAULT_CONFIG_PATH",
    "AgentConfig",
    "CircuitBreakerConfig",
    "ConfigError",
    "DatabaseConfig",
    "FailedSecretsConfig",
    "GrpcRetryConfig",
    "HeistConfig",
    "LLMConfig",
    "McpGatewayConfig",
    "MemoryContextConfig",
    "MeshConfig",
    "OAuthConfig",
    "ResilienceConfig",
    "SecurityConfig",
    "ServerConfig",
    "ServiceConfig",
    "SessionConfig",
    "default_config_path",
    "format_validation_error",
    "load_config",
    "located",
    "redact_url",
    "redact_urls",
    "replica_address",
    "resolve_database_url",
    "split_address",
]

DEFAULT_CONFIG_PATH = Path("config/heist.yaml")
CONFIG_PATH_ENV = "HEIST_CONFIG"
PLACEHOLDER_API_KEY = "not-needed"
MAX_CONFIG_BYTES = 1024 * 1024
"""A config file is a page of YAML; anything bigger is a mistake, not a configuration."""

# Strict scalars: YAML already types its values, so "3" for a number is a mistake worth reporting.
NonEmpty = Annotated[str, Field(strict=True, min_length=1, pattern=r"\S")]
Positive = Annotated[float, Field(strict=True, gt=0)]
AtLeastOne = Annotated[int, Field(strict=True, ge=1)]
NotNegative = Annotated[int, Field(strict=True, ge=0)]
Flag = Annotated[bool, Field(strict=True)]

ToolCallingMode = Literal["native", "inline", "auto"]
PromptStyle = Literal["chat", "transcript"]
"""chat: system/user messages to /chat/completions (instruction-tuned models).
transcript: the meeting as a plain-text transcript to /completions, which the
model continues with the speaker's next line (small base models such as the
embedded Gemma 3 270M, which have no chat template)."""
ConstrainedToolsMode = Literal["auto", "grammar", "json_schema", "off"]
"""How tool-call arguments are constrained (``orchestrator.turn.constrained_tools``): ``grammar``
sends llama.cpp's GBNF ``grammar`` field (transcript markers, inline chat markers),
``json_schema`` sends the derived schemas as strict tool definitions (native
function calling), ``auto`` uses whichever fits the turn and drops it for the rest
of the run once the server rejects the field, ``off`` sends neither."""
TurnStrategyName = Literal["round_robin", "random"]


class ConfigError(ValueError):
    """The configuration file is missing, malformed, or has an unknown key or a wrong type."""


class Section(BaseModel):
    """Every mapping of the file: unknown keys are errors, values are immutable once loaded."""

    # defer_build: a model's validator is compiled when the config is first validated, once for
    # the whole tree, instead of once per section at import and again inside its parent
    # (a part of every command's start-up: docs/performance.md).
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


def split_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (or ``[v6]:port``) and validate the port; ValueError if malformed."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"address {address!r}: port {port} is out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


class MeshConfig(Section, RunFolder):
    """Mesh-wide settings: the run folder (see ``RunFolder`` for its layout) and the drain grace period."""

    run_dir: Path = Field(
        default=Path("var"),
        description="Git-ignored folder for pid files, logs, generated dev credentials, the audit database, "
        "the assembled model and exported session logs (relative: under the repository root).",
    )
    shutdown_grace_s: Positive = Field(
        default=2.0,
        description="Seconds a server lets calls in flight finish after SIGTERM (it reports NOT_SERVING first).",
    )

    @field_validator("run_dir")
    @classmethod
    def _anchor(cls, value: Path) -> Path:
        return anchored(value)


class ServerConfig(Section):
    """Transport bounds of one gRPC server: what a client can hold open, and for how long.

    The defaults keep a flood of idle or half-open connections from using up the
    server's file descriptors, while a mesh client (one channel, a few calls at a
    time) never comes near them.
    """

    max_connections: AtLeastOne = Field(
        default=512, description="Accepted connections at once (gRPC's `grpc.max_allowed_incoming_connections`)."
    )
    max_concurrent_rpcs: AtLeastOne = Field(
        default=256, description="Calls in progress at once; more get RESOURCE_EXHAUSTED."
    )
    max_concurrent_streams: AtLeastOne = Field(
        default=1000,
        description="Calls at once on one connection (a burst above this on a fresh connection is refused, "
        "not queued).",
    )
    handshake_timeout_s: Positive = Field(
        default=5.0, description="A connection that has not finished its HTTP/2 handshake by then is closed."
    )
    max_connection_idle_s: Positive = Field(
        default=300.0,
        description="A connection with no call for this long is closed (clients reconnect transparently).",
    )
    max_connection_age_s: Positive = Field(
        default=1800.0,
        description="Every connection is recycled after this long (lets clients rebalance), with a 10 s grace.",
    )
    min_ping_interval_s: Positive = Field(
        default=10.0,
        description="Keepalive pings more frequent than this count as abuse (two strikes close the connection).",
    )
    max_receive_bytes: AtLeastOne = Field(default=1024 * 1024, description="Largest request message, in bytes.")
    metrics_max_connections: AtLeastOne = Field(
        default=16,
        description="Connections open at once on the metrics port (`metrics_address`); a newcomer replaces the "
        "oldest one that has not sent its request yet, or is closed at once.",
    )
    metrics_timeout_s: Positive = Field(
        default=5.0, description="A metrics connection is closed this long after it opened, answered or not."
    )


REPLICA_PORT_STEP = 100
"""Replica ``i`` of a service at ``host:port`` listens on ``host:(port + 100*i)``."""


def replica_address(address: str, index: int) -> str:
    """Where replica ``index`` (0-based) of a service at ``address`` listens: the port moves by 100 per replica."""
    host, port = split_address(address)
    if index and port == 0:
        raise ValueError(f"address {address!r}: replicas need a fixed port, not 0")
    shifted = port + REPLICA_PORT_STEP * index
    if shifted > 65535:
        raise ValueError(f"address {address!r}: replica {index} would need port {shifted}")
    return f"[{host}]:{shifted}" if ":" in host else f"{host}:{shifted}"


class ServiceConfig(Section):
    """One gRPC service: where it listens (and is dialled), the callers' deadline, its own limits."""

    address: NonEmpty = Field(
        description="`host:port` the server listens on and the orchestrator dials (replicas need an IP-literal host)."
    )
    deadline_s: Positive = Field(
        default=2.0, description="Deadline of every call the orchestrator makes to this service."
    )
    replicas: Annotated[int, Field(strict=True, ge=1, le=16)] = Field(
        default=1,
        description="Processes serving this service, replica `i` on `port + 100*i` "
        "(stateless services only; memory needs `store`).",
    )
    metrics_address: str | None = Field(
        default=None,
        description="`host:port` where the server serves Prometheus metrics (`GET /metrics`); "
        "unset: no metrics endpoint.",
    )
    health_address: str | None = Field(
        default=None,
        description="`host:port` of a second, plaintext port that serves only `grpc.health.v1` (the same statuses "
        "as the API port), for probes that cannot present a client certificate (the kubelet); unset: health "
        "is answered on the API port only.",
    )
    server: ServerConfig = Field(default=ServerConfig(), description="Transport bounds of this service's gRPC server.")
    store: str | None = Field(
        default=None,
        description="Where a stateful service keeps its state (memory: `redis://host:port/db`, `rediss://` or "
        "`unix://`); unset: in the server process.",
    )
    limits: dict[str, Any] = Field(
        default_factory=dict,
        description="The service's own bounds, validated by its `Limits` model when it starts "
        "(`make serve` checks them all first).",
    )

    @field_validator("store")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected a redis:// (or rediss://, unix://) URL, got {redact_url(value)!r}")
        return value

    @field_validator("address")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        split_address(value)
        return value

    @model_validator(mode="after")
    def _replica_ports(self) -> ServiceConfig:
        replica_address(self.address, self.replicas - 1)
        return self

    @property
    def replica_addresses(self) -> tuple[str, ...]:
        """Every replica's address, replica 0 (``address`` itself) first."""
        return tuple(replica_address(self.address, index) for index in range(self.replicas))

    @field_validator("metrics_address", "health_address")
    @classmethod
    def _valid_side_address(cls, value: str | None) -> str | None:
        if value is not None:
            split_address(value)
        return value

    @property
    def host(self) -> str:
        """Host part of ``address`` (IPv6 brackets removed)."""
        return split_address(self.address)[0]

    @property
    def port(self) -> int:
        """Port part of ``address``."""
        return split_address(self.address)[1]

    @property
    def metrics_url(self) -> str | None:
        """``http://host:port/metrics`` of ``metrics_address`` (None when metrics are off)."""
        if self.metrics_address is None:
            return None
        host, port = split_address(self.metrics_address)
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


class FailedSecretsConfig(Section):
    """How the OAuth server slows down secret guessing (``servers.oauth.service.FailedSecrets``).

    Failures are counted per client id *and caller*: the client certificate's
    identity under mTLS, else the peer's host (an IPv6 peer by its /64), never
    the port, so new connections buy no new attempts. Why per caller: a lock on
    the client id alone let anyone who knows a client's name lock its owner out.
    """

    free_failures: Annotated[int, Field(strict=True, ge=1, le=100)] = Field(
        default=3, description="Failed secrets a caller may send for one client before it has to wait."
    )
    max_lockout_s: Annotated[float, Field(strict=True, gt=0, le=3600)] = Field(
        default=60.0,
        description="Longest wait: the first failure past the free ones waits 1 s, each further one twice as long, "
        "up to this.",
    )
    tracked: Annotated[int, Field(strict=True, ge=100, le=1_000_000)] = Field(
        default=10_000,
        description="Failure records kept, one per (client id, caller); the least recently failed are forgotten "
        "first, so memory stays bounded whatever callers send.",
    )


class OAuthConfig(Section):
    """Token issuer identity and the registered clients with the scopes each may be granted."""

    issuer: NonEmpty = Field(
        default="heist-oauth", description="JWT `iss` of every token; servers check it on every token they verify."
    )
    audience: NonEmpty = Field(
        default="heist-mesh", description="JWT `aud` of every token; servers check it on every token they verify."
    )
    token_ttl_s: AtLeastOne = Field(
        default=900, description="Token lifetime in seconds (the orchestrator fetches a new one after 80 % of it)."
    )
    clients: dict[NonEmpty, tuple[NonEmpty, ...]] = Field(
        default_factory=dict,
        description="OAuth client id -> the scopes it may be granted; each client's secret comes from "
        "`HEIST_OAUTH_CLIENT_SECRET_<ID>`, the file `<ID>` in `HEIST_OAUTH_CLIENT_SECRETS_DIR`, or the generated "
        "dev credentials, never from this file.",
    )
    failed_secrets: FailedSecretsConfig = Field(
        default=FailedSecretsConfig(),
        description="How guessing client secrets is slowed down: per client and caller, so a guesser never makes "
        "another caller's right secret wait.",
    )


class McpGatewayConfig(Section):
    """The MCP gateway (``servers.mcp_gateway``): every tool service as MCP tools over Streamable HTTP.

    Why bounds here and not per tool: the gateway faces clients the mesh does not run (desktop
    assistants, IDE agents), so what one client may send and how often is bounded before any tool
    service sees a call; each tool service still applies its own ``limits``.
    """

    address: NonEmpty = Field(
        default="127.0.0.1:18060",
        description="`host:port` the gateway's HTTP server listens on (HTTPS with the mesh's certificates when "
        "`security.transport` is `mtls`).",
    )
    path: Annotated[str, Field(strict=True, pattern=r"^/[A-Za-z0-9/_-]*$")] = Field(
        default="/mcp", description="URL path of the MCP Streamable HTTP endpoint."
    )
    metrics_address: str | None = Field(
        default=None,
        description="`host:port` where the gateway serves Prometheus metrics (`GET /metrics`); unset: none.",
    )
    oauth_client: NonEmpty = Field(
        default="mcp_gateway",
        description="The gateway's own OAuth client (in `oauth.clients`, with every tool scope it relays): it "
        "calls the tool services with its token and its `mcp_gateway` client certificate.",
    )
    max_request_bytes: Annotated[int, Field(strict=True, ge=1024, le=16 * 1024 * 1024)] = Field(
        default=65_536, description="Largest HTTP request body the gateway reads (a bigger one gets HTTP 413)."
    )
    calls_per_second: Annotated[float, Field(strict=True, gt=0, le=10_000)] = Field(
        default=20.0, description="Sustained tools/call rate per OAuth client; calls above it get a tool error."
    )
    burst: Annotated[int, Field(strict=True, ge=1, le=10_000)] = Field(
        default=40, description="Tool calls a client may make at once above `calls_per_second` (token bucket size)."
    )
    max_concurrent_calls: Annotated[int, Field(strict=True, ge=1, le=10_000)] = Field(
        default=32, description="Tool calls in flight through the gateway at once, all clients together."
    )
    max_concurrent_per_client: Annotated[int, Field(strict=True, ge=1, le=10_000)] = Field(
        default=8, description="Tool calls one OAuth client may have in flight at once."
    )
    max_sessions: Annotated[int, Field(strict=True, ge=1, le=100_000)] = Field(
        default=256, description="MCP sessions open at once (the SDK refuses new ones beyond it)."
    )
    session_idle_s: Annotated[float, Field(strict=True, gt=0, le=86_400)] = Field(
        default=1800.0, description="An MCP session idle this long is closed."
    )

    @field_validator("address", "metrics_address")
    @classmethod
    def _valid_address(cls, value: str | None) -> str | None:
        if value is not None:
            split_address(value)
        return value

    @property
    def host(self) -> str:
        """Host part of ``address``."""
        return split_address(self.address)[0]

    @property
    def port(self) -> int:
        """Port part of ``address``."""
        return split_address(self.address)[1]


class AgentConfig(Section):
    """One crew member: who it is, which tool services it may use, and which OAuth client it is."""

    name: NonEmpty = Field(description="Unique name; the transcript's speaker and the audit's `agent_name`.")
    role: NonEmpty = Field(description="Role shown beside the name in prompts and transcripts.")
    system_prompt: NonEmpty = Field(description="Who the agent is and how it speaks.")
    tools: tuple[NonEmpty, ...] = Field(
        default=(), description="Tool services (keys of `services`, not oauth or memory) the agent may call."
    )
    oauth_client: str = Field(
        default="",
        description="OAuth client whose tokens the agent uses (must be in `oauth.clients` when it has tools); "
        "empty: the agent's name.",
    )
    scopes: tuple[NonEmpty, ...] = Field(
        default=(), description="Scopes asked for beyond those its tools' protos require."
    )
    is_saboteur: Flag = Field(
        default=False, description="Adds a secret brief to the system prompt: steer the crew towards mistakes."
    )
    require_approval: tuple[NonEmpty, ...] = Field(
        default=(),
        description="Tool services (of `tools`) whose every call by this agent waits for a person's approval "
        "(`orchestrator approve`/`deny`, or y/n on a terminal); a method whose proto says `APPROVAL_REQUIRED` "
        "always waits (docs/approvals.md).",
    )
    max_llm_tokens: AtLeastOne | None = Field(
        default=None,
        description="The most LLM tokens (prompt plus completion) this agent's turns may use in one session; "
        "the turn that goes over it is recorded, then the session ends `failed` (reason `budget`, exit 1). "
        "Null: no limit of its own (`session.max_llm_tokens` still applies).",
    )

    @model_validator(mode="after")
    def _default_client(self) -> AgentConfig:
        unknown = [tool for tool in self.require_approval if tool not in self.tools]
        if unknown:
            raise ValueError(f"require_approval names {unknown}, not among the agent's tools {list(self.tools)}")
        if not self.oauth_client:
            object.__setattr__(self, "oauth_client", self.name)
        return self


class LLMConfig(Section):
    """The OpenAI-compatible endpoint and how to talk to it."""

    embedded: Flag = Field(
        default=True, description="`make serve` starts the llama.cpp server with Gemma 3 270M (`LLM=off` skips it)."
    )
    parallel: Annotated[int, Field(strict=True, ge=1, le=16)] = Field(
        default=4,
        description="Slots of the embedded llama-server: requests it generates at once, batched continuously "
        "(each slot gets its own context).",
    )
    threads: Annotated[int, Field(strict=True, ge=1, le=256)] | None = Field(
        default=None,
        description="CPU threads of the embedded llama-server, for generation and prompt batches "
        "(null: one per core this machine lets it use). Fewer leave cores to other work on a shared machine.",
    )
    base_url: NonEmpty = Field(
        default="http://127.0.0.1:1234/v1",
        description="The OpenAI-compatible endpoint (`--llm-base-url` overrides it).",
    )
    model: NonEmpty = Field(
        default="gemma-3-270m", description="Model name sent with every request (`--model` overrides it)."
    )
    api_key_env: NonEmpty = Field(
        default="HEIST_LLM_API_KEY",
        description="Environment variable holding the API key (unset: a placeholder, which local servers ignore).",
    )
    temperature: Annotated[float, Field(strict=True, ge=0, le=2)] = Field(
        default=0.7, description="Sampling temperature."
    )
    max_tokens: AtLeastOne = Field(default=256, description="Most tokens one reply may have.")
    timeout_s: Positive = Field(default=60.0, description="Timeout of one LLM request (the openai client's own).")
    health_timeout_s: Positive = Field(
        default=10.0, description="Deadline of the one-token health probe (a cold model's first token takes a while)."
    )
    max_retries: NotNegative = Field(
        default=1, description="Retries of a failed LLM request (the openai client's own)."
    )
    prompt_style: PromptStyle = Field(
        default="chat",
        description="`chat`: system and user messages to `/chat/completions` (instruction-tuned models); "
        "`transcript`: the meeting as plain text to `/completions`, continued one line per turn (base models).",
    )
    tool_calling: ToolCallingMode = Field(
        default="inline",
        description="`native`: OpenAI function calling (chat only); `inline`: `[TOOL:name:argument]` markers; "
        "`auto`: native if the reply has tool_calls, else markers.",
    )
    prefill_tool_every: NotNegative = Field(
        default=0,
        description="Every N-th turn of an agent with tools calls a tool (0: never). Transcript: the line starts "
        "with its marker's opening, `[TOOL:<tool>:`; chat with functions offered (`native`, `auto`): the "
        "turn's first request forces a function call (`tool_choice`).",
    )
    max_tool_rounds: AtLeastOne = Field(default=2, description="Native function-calling rounds per turn.")
    constrained_tools: ConstrainedToolsMode = Field(
        default="auto",
        description="Tool arguments under a constraint derived from the proto: `grammar` (llama.cpp GBNF), "
        "`json_schema` (strict tool definitions), `auto` (whichever fits; dropped for the run, and audited, "
        "if the server rejects it), `off`.",
    )
    repeat_penalty: Annotated[float, Field(strict=True, ge=0)] | None = Field(
        default=None, description="Sampling extra (llama.cpp, vLLM); servers that do not know it ignore it."
    )
    top_p: Annotated[float, Field(strict=True, ge=0, le=1)] | None = Field(
        default=None, description="Nucleus sampling (sent as an extra)."
    )
    top_k: AtLeastOne | None = Field(default=None, description="Sampling extra; servers that do not know it ignore it.")
    stop: tuple[Annotated[str, Field(strict=True, min_length=1)], ...] = Field(
        default=(), description="Extra stop sequences (a newline always ends a transcript turn)."
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value.rstrip("/")

    @field_validator("tool_calling")
    @classmethod
    def _mode_fits_style(cls, value: str, info: ValidationInfo) -> str:
        if value == "native" and info.data.get("prompt_style") == "transcript":
            raise ValueError("native function calling needs prompt_style: chat (transcript uses markers)")
        return value

    @model_validator(mode="after")
    def _meaningful_combination(self) -> LLMConfig:
        """Refuse settings that the chosen style and tool calling would silently ignore.

        Each would otherwise run without error and without effect (e.g. strict
        function schemas for a crew that is offered no functions: no tool calls
        at all), which is much harder to notice than a refusal naming the keys.
        """
        offers_functions = self.prompt_style == "chat" and self.tool_calling != "inline"
        if self.constrained_tools == "json_schema" and not offers_functions:
            reason = "tool_calling: inline" if self.prompt_style == "chat" else "prompt_style: transcript"
            raise ValueError(
                f"constrained_tools: json_schema constrains the functions offered, and {reason} offers none; "
                "use constrained_tools: grammar or auto (markers), or prompt_style: chat with tool_calling: "
                "native or auto"
            )
        if self.constrained_tools == "grammar" and offers_functions:
            raise ValueError(
                "constrained_tools: grammar constrains [TOOL:...] markers in replies offered no functions, and "
                f"tool_calling: {self.tool_calling} offers functions; use constrained_tools: json_schema or auto, "
                "or tool_calling: inline"
            )
        if self.prefill_tool_every and self.prompt_style == "chat" and self.tool_calling == "inline":
            raise ValueError(
                f"prefill_tool_every: {self.prefill_tool_every} makes tool calls through a transcript prefill or "
                "a chat tool_choice, and prompt_style: chat with tool_calling: inline has neither; set "
                "prefill_tool_every: 0, or use tool_calling: native or auto, or prompt_style: transcript"
            )
        return self

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


class MemoryContextConfig(Section):
    """How much of an agent's own memory goes back into its prompt."""

    recent_count: AtLeastOne = Field(default=5, description="The agent's own last N memories in its prompt.")
    max_chars: AtLeastOne = Field(default=100, description="Each of those memories cut to this many characters.")
    max_store_chars: AtLeastOne = Field(
        default=2000,
        description="Longest message the orchestrator stores as memory (a huge reply is cut, never re-sent "
        "every turn).",
    )


class SessionConfig(Section):
    """Shape of one heist conversation."""

    max_turns: AtLeastOne = Field(default=8, description="Agent turns per run (`--turns` overrides it).")
    max_turns_allowed: AtLeastOne = Field(
        default=10_000,
        description="The most turns a run may ask for (`--turns`), so a typo cannot start an endless run.",
    )
    turn_order: tuple[NonEmpty, ...] = Field(
        default=(), description="Who speaks in which order; every agent exactly once. Empty: the order of `agents`."
    )
    strategy: TurnStrategyName = Field(
        default="round_robin",
        description="`round_robin`, or `random`: the planner (else the first of the order) opens, then a random "
        "other agent, never the same twice in a row (`--seed` reproduces it).",
    )
    context_messages: NotNegative = Field(default=5, description="Last N conversation messages in each prompt.")
    objective: NonEmpty = Field(
        default="Plan the First Meridian Bank vault job. Share what you know and propose the next step.",
        description="The briefing every agent sees.",
    )
    tool_result_max_chars: AtLeastOne = Field(
        default=1500, description="A tool result given back to the model is cut to this many characters."
    )
    memory: MemoryContextConfig = Field(
        default=MemoryContextConfig(), description="How much of an agent's own memory goes into its prompt."
    )
    oauth_client: NonEmpty = Field(
        default="orchestrator",
        description="The OAuth client the orchestrator itself is, for session-wide calls (the memory service).",
    )
    approval_timeout_s: Positive = Field(
        default=300.0,
        description="How long a tool call waits for a person's approval before it is denied by timeout "
        "(docs/approvals.md).",
    )
    stale_after_s: Positive = Field(
        default=600.0,
        description="`orchestrator resume`: an `active` session with no committed turn for this long counts as "
        "dead (at once if its process on this machine is gone). Keep it above the slowest possible turn.",
    )
    max_llm_tokens: AtLeastOne | None = Field(
        default=None,
        description="The most LLM tokens (prompt plus completion, all agents, estimates where the server reports "
        "no usage) one session may use; the turn that goes over it is recorded, then the session ends `failed` "
        "(reason `budget`, exit 1). A resumed session counts on from its audited total. Null: no budget.",
    )


AUDIT_URL_SCHEMES = ("sqlite", "postgresql", "postgres")


class DatabaseConfig(Section):
    """Where the audit trail lives (a ``playhouse.db_url`` URL; default: a SQLite file in the run folder)."""

    url: NonEmpty = Field(
        description="`sqlite:///PATH` or `postgresql://USER@HOST:PORT/DB` (the password comes from `PGPASSWORD` or "
        "`~/.pgpass`, never the URL). Unset: `sqlite:///<mesh.run_dir>/audit/heist.db`; a relative SQLite path "
        "is under the repository root. `--db` overrides it."
    )

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.partition("://")[0]
        if "://" not in value or scheme not in AUDIT_URL_SCHEMES:
            raise ValueError(
                f"unsupported database URL {redact_url(value)!r}: use sqlite:///PATH or postgresql://USER@HOST/DB"
            )
        return value


class GrpcRetryConfig(Section):
    """GRPC's built-in retryPolicy for UNAVAILABLE (applied through the channel's service config)."""

    max_attempts: Annotated[int, Field(strict=True, ge=2, le=5)] = Field(
        default=3, description="Attempts per call, the first included (gRPC caps them at 5)."
    )
    initial_backoff_s: Positive = Field(default=0.05, description="Back-off before the first retry.")
    max_backoff_s: Positive = Field(default=0.5, description="Longest back-off between two attempts.")
    backoff_multiplier: Positive = Field(default=2.0, description="Each back-off is this many times the previous one.")


class CircuitBreakerConfig(Section):
    """When a service is considered down and how long to leave it alone."""

    failure_threshold: AtLeastOne = Field(
        default=3,
        description="Consecutive outage failures (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, UNKNOWN) that open "
        "the circuit.",
    )
    reset_timeout_s: Positive = Field(
        default=10.0, description="Seconds an open circuit skips calls before one trial call may go through."
    )


class ResilienceConfig(Section):
    """Retry and circuit-breaker numbers, the health-check deadline and the LLM's breaker."""

    grpc_retry: GrpcRetryConfig = Field(
        default=GrpcRetryConfig(), description="gRPC's own retry policy, for UNAVAILABLE only."
    )
    circuit_breaker: CircuitBreakerConfig = Field(
        default=CircuitBreakerConfig(), description="One circuit breaker per service."
    )
    health_timeout_s: Positive = Field(
        default=1.0, description="Deadline of the start-up health check of each service."
    )
    llm_max_consecutive_failures: AtLeastOne = Field(
        default=3, description="This many turns in a row without an LLM answer end the session `failed` (exit 1)."
    )


class SecurityConfig(Section):
    """Transport security of every gRPC hop (``heist_common.tls``)."""

    transport: Literal["mtls", "plaintext"] = Field(
        default="mtls",
        description="`mtls`: every server requires a client certificate from the mesh CA and clients verify the "
        "server's; `plaintext`: the explicit opt-out (e.g. behind a sidecar mesh that does mTLS).",
    )


STATEFUL_SERVICES = ("memory",)
"""Services whose state lives in the process unless ``store`` moves it out (then they may have replicas)."""

REQUIRED_SERVICES = ("oauth", "memory")
"""The mesh's own services; every other entry of ``services`` but ``orchestrator`` is a tool service."""

ORCHESTRATOR_SERVICE = "orchestrator"
"""``orchestrator serve``: heists as A2A tasks (``orchestrator.service``); the crew never calls it."""


class HeistConfig(Section):
    """The whole file."""

    mesh: MeshConfig = Field(default=MeshConfig(), description="The run folder and the drain grace period.")
    services: dict[NonEmpty, ServiceConfig] = Field(
        description="Every gRPC service by name: `oauth` and `memory`, each tool service, and optionally "
        "`orchestrator` (`orchestrator serve`, A2A's gRPC binding). A service `<name>` has its contract in "
        "`protos/heist/<name>/v1/<name>.proto` (the orchestrator's is A2A's) and its servicer in `servers.<name>`."
    )
    oauth: OAuthConfig = Field(default=OAuthConfig(), description="Token issuer identity and the registered clients.")
    agents: tuple[AgentConfig, ...] = Field(min_length=1, description="The crew, at least one agent.")
    llm: LLMConfig = Field(default=LLMConfig(), description="The OpenAI-compatible endpoint and how to talk to it.")
    session: SessionConfig = Field(default=SessionConfig(), description="Shape of one heist conversation.")
    database: DatabaseConfig = Field(description="Where the audit trail lives.")
    resilience: ResilienceConfig = Field(
        default=ResilienceConfig(), description="Retries, circuit breakers, health-check deadline, the LLM's breaker."
    )
    security: SecurityConfig = Field(default=SecurityConfig(), description="Transport security of every gRPC hop.")
    mcp_gateway: McpGatewayConfig | None = Field(
        default=None,
        description="The MCP gateway `make serve` starts beside the services (docs/mcp.md); unset: no gateway.",
    )
    _source: Path = PrivateAttr(default=DEFAULT_CONFIG_PATH)

    @model_validator(mode="before")
    @classmethod
    def _default_database(cls, data: Any) -> Any:
        """Put the audit database in the run folder unless ``database.url`` says otherwise."""
        if not isinstance(data, dict):
            return data
        mesh = data.get("mesh")
        run_dir = mesh.get("run_dir", "var") if isinstance(mesh, dict) else "var"
        database = data.get("database")
        if database is None:
            database = {}
        if isinstance(database, dict) and isinstance(run_dir, str) and isinstance(database.get("url"), str | None):
            database = {**database, "url": resolve_database_url(database.get("url"), anchored(Path(run_dir)))}
        return {**data, "database": database}

    @model_validator(mode="after")
    def _consistent(self) -> HeistConfig:
        missing = [name for name in REQUIRED_SERVICES if name not in self.services]
        if missing:
            raise ValueError(f"services: missing required service(s): {', '.join(missing)}")
        for name in STATEFUL_SERVICES:
            settings = self.services[name]
            if settings.replicas > 1 and settings.store is None:
                raise ValueError(
                    f"services.{name}.replicas: {settings.replicas} replicas need the state outside the process "
                    f"(services.{name}.store: redis://...)"
                )
        names = [agent.name for agent in self.agents]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"agents: duplicate agent names: {', '.join(duplicates)}")
        for index, agent in enumerate(self.agents):
            for tool in agent.tools:
                if tool not in self.tool_names:
                    known = ", ".join(self.tool_names) or "none"
                    raise ValueError(f"agents[{index}].tools: unknown tool {tool!r} (tool services: {known})")
            if agent.tools and agent.oauth_client not in self.oauth.clients:
                raise ValueError(
                    f"agents[{index}].oauth_client: {agent.oauth_client!r} is not in oauth.clients "
                    f"(known: {', '.join(sorted(self.oauth.clients))})"
                )
        gateway = self.mcp_gateway
        if gateway is not None and gateway.oauth_client not in self.oauth.clients:
            raise ValueError(
                f"mcp_gateway.oauth_client: {gateway.oauth_client!r} is not in oauth.clients "
                f"(known: {', '.join(sorted(self.oauth.clients))})"
            )
        order = self.session.turn_order
        if order:
            unknown = [name for name in order if name not in names]
            if unknown:
                raise ValueError(f"session.turn_order: names unknown agents: {', '.join(unknown)}")
            absent = [name for name in names if name not in order]
            if absent:
                raise ValueError(f"session.turn_order: is missing agents: {', '.join(absent)}")
            if len(set(order)) != len(order):
                raise ValueError("session.turn_order: lists an agent more than once")
        return self

    # -- views -------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        """The file this was read from (absolute)."""
        return self._source

    @property
    def tool_names(self) -> tuple[str, ...]:
        """Services an agent may use as tools: every service but the mesh's own and the orchestrator's."""
        return tuple(name for name in self.crew_services if name not in REQUIRED_SERVICES)

    @property
    def crew_services(self) -> tuple[str, ...]:
        """Services a session calls (and health-checks): every one but the orchestrator service itself."""
        return tuple(name for name in self.services if name != ORCHESTRATOR_SERVICE)

    @property
    def turn_order(self) -> tuple[str, ...]:
        """Who speaks in which order (the crew's order unless ``session.turn_order`` says otherwise)."""
        return self.session.turn_order or tuple(agent.name for agent in self.agents)

    @property
    def agents_by_name(self) -> dict[str, AgentConfig]:
        """Agents keyed by name, in configured order."""
        return {agent.name: agent for agent in self.agents}

    @property
    def sessions_dir(self) -> Path:
        """Default folder for exported session logs."""
        return self.mesh.sessions_dir

    def service(self, name: str) -> ServiceConfig:
        """Return one service's settings; the KeyError names the known services."""
        try:
            return self.services[name]
        except KeyError:
            raise KeyError(f"unknown service {name!r} (known: {', '.join(self.services)})") from None

    # -- copies (tests move services to ephemeral ports) ------------------------------------

    def with_service_address(self, name: str, address: str) -> HeistConfig:
        """Return a copy with one service moved."""
        split_address(address)
        services = {**self.services, name: self.service(name).model_copy(update={"address": address})}
        return self.with_overrides(services=services)

    def with_overrides(self, **sections: Any) -> HeistConfig:
        """Return a copy with whole sections replaced, e.g. ``llm=cfg.llm.model_copy(update=...)``."""
        copy = self.model_copy(update=sections)
        copy._source = self._source
        return copy


def redact_url(url: str) -> str:
    """Return the URL with any password replaced by ``***`` (safe to print and log)."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in credentials:
        return url
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"


_URL_PASSWORD = re.compile(r"(?P<start>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*):[^\s/@]*@")


def redact_urls(text: str) -> str:
    """Return ``text`` with the password of every URL in it replaced by ``***``; nothing else changes.

    For messages that may quote URLs (errors naming a database): ``redact_url``
    takes one whole URL, and on a longer text would cut what lies between its
    first "://" and its last "@".
    """
    return _URL_PASSWORD.sub(r"\g<start>:***@", text)


def resolve_database_url(url: str | None, run_dir: Path) -> str:
    """Default to ``<run_dir>/audit/heist.db``; anchor a relative SQLite path at the repository root."""
    if url is None:
        return f"sqlite:///{run_dir / 'audit' / 'heist.db'}"
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix + ":memory:":
        return prefix + str(REPO_ROOT / url[len(prefix) :])
    return url


def default_config_path() -> Path:
    """``$HEIST_CONFIG`` if set, else ``config/heist.yaml`` relative to the working directory.

    Installed from a wheel, with no such file in the working directory, the
    config shipped inside the package instead (see ``located``).
    """
    return located(Path(os.environ.get(CONFIG_PATH_ENV) or DEFAULT_CONFIG_PATH))


def located(path: Path) -> Path:
    """``path``, except the default ``config/heist.yaml`` that an installed wheel's user has not made.

    A checkout always has that file (relative to its root). An installed wheel
    has no repository, so the servers' and the orchestrator's default finds the
    config shipped in the package until the user writes one of their own.
    """
    if not IN_CHECKOUT and path == DEFAULT_CONFIG_PATH and not path.exists():
        return shipped_config_path()
    return path


def format_validation_error(error: ValidationError, source: str, prefix: tuple[str | int, ...] = ()) -> str:
    """Each pydantic error as ``file: key.path: message``, one per line, in the words a YAML editor needs."""
    lines = []
    for item in error.errors():
        where = _dotted((*prefix, *item["loc"]))
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "missing required key"
        lines.append(f"{source}: {where}: {message}" if where else f"{source}: {message}")
    return "\n".join(lines)


def _dotted(location: tuple[str | int, ...]) -> str:
    """``("agents", 1, "tools")`` -> ``agents[1].tools``."""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses duplicate keys (the second one would silently win otherwise)."""


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    keys = [loader.construct_object(key_node) for key_node, _ in node.value]
    seen = {key for key in keys if keys.count(key) > 1}
    if seen:
        raise yaml.constructor.ConstructorError(
            None, None, f"duplicate key {sorted(map(str, seen))[0]!r}", node.start_mark
        )
    return dict(loader.construct_mapping(node))


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def read_yaml(path: Path) -> Mapping[str, Any]:
    """Read the file as a YAML mapping; ConfigError (never a traceback) for every way that can fail."""
    source = str(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: config is larger than {MAX_CONFIG_BYTES // 1024} KiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}: invalid YAML{where}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, *, check_contracts: bool = True) -> HeistConfig:
    """Read and validate the whole config file; raise ``ConfigError`` naming key and file.

    ``check_contracts=False`` skips importing every service's generated contract
    (gRPC and the protos, about a tenth of a second): for commands that read the
    audit trail and call no service.
    """
    config_path = located(Path(path)) if path is not None else default_config_path()
    data = read_yaml(config_path)
    try:
        config = HeistConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(config_path))) from None
    except RecursionError:
        raise ConfigError(f"{config_path}: nested too deeply") from None
    config._source = config_path.resolve()
    if check_contracts:
        _check_contracts(config)
    return config


def _check_contracts(config: HeistConfig) -> None:
    """Every configured service needs a generated contract, and an agent's tools must offer methods to models."""
    from heist_common.contract import ContractError, contract_of  # the generated code, only once the file is valid

    for name in config.services:
        try:
            contract = contract_of(name)
        except ContractError as exc:
            raise ConfigError(f"{config.config_path}: services.{name}: {exc}") from None
        if name in config.tool_names and not contract.is_tool:
            raise ConfigError(
                f"{config.config_path}: services.{name}: {contract.full_name} has no method with a "
                "tool_description, so agents cannot use it as a tool"
            )
