"""Typed, strict view of the parts of ``config/heist.yaml`` that the servers own.

Why strict: a typo such as ``adress`` would otherwise silently fall back to a
default and send a server to the wrong port, so an unknown key or a wrong type
fails loudly with the key path and the file. The servers own the sections
``mesh``, ``services``, ``oauth`` and ``limits``; every other top-level section
(agents, llm, session, database, resilience, ...) belongs to the orchestrator
and is ignored here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
"""Relative paths in the config are resolved against the repository root."""

SERVICE_NAMES: tuple[str, ...] = ("oauth", "memory", "calculator", "file_reader", "database_query")
"""Every gRPC service of the mesh, in start order (oauth first: it creates the dev credentials)."""

DEFAULT_DOCUMENTS_DIR = Path(__file__).resolve().parent / "data" / "documents"


class ConfigError(ValueError):
    """The configuration file is missing, malformed, or has an unknown key or a wrong type."""


@dataclass(frozen=True)
class ServiceSettings:
    """Where one service listens (and is dialled) and the deadline callers give it."""

    address: str
    deadline_s: float

    @property
    def host(self) -> str:
        """Host part of ``address`` (IPv6 brackets removed)."""
        return split_address(self.address)[0]

    @property
    def port(self) -> int:
        """Port part of ``address``."""
        return split_address(self.address)[1]


@dataclass(frozen=True)
class OAuthSettings:
    """Token issuer identity and the registered clients with the scopes each may get."""

    issuer: str = "heist-oauth"
    audience: str = "heist-mesh"
    token_ttl_s: int = 900
    clients: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class CalculatorLimits:
    """Bounds that keep one expression from eating the CPU or memory (e.g. ``9**9**9**9``)."""

    max_expression_chars: int = 500
    max_exponent: int = 1024
    max_integer_digits: int = 300
    max_nodes: int = 200


@dataclass(frozen=True)
class FileReaderLimits:
    """Which folder the file reader serves and the biggest file it returns."""

    documents_dir: Path = DEFAULT_DOCUMENTS_DIR
    max_file_bytes: int = 256 * 1024
    max_listed_entries: int = 2000
    """Entries (files and folders) ListFiles examines before it gives up with RESOURCE_EXHAUSTED."""
    max_folder_depth: int = 8
    """Nested folders below the documents folder that are listed and read."""


@dataclass(frozen=True)
class DatabaseQueryLimits:
    """Row, time and size bounds on one SQL query."""

    max_rows: int = 200
    query_timeout_s: float = 2.0
    max_sql_chars: int = 4000
    max_value_bytes: int = 64 * 1024
    """SQLITE_LIMIT_LENGTH: the longest string or blob any expression may build."""
    max_response_bytes: int = 1024 * 1024
    """The biggest result (values plus framing) one query may return."""
    max_concurrent_queries: int = 4
    """Query worker processes running at once."""
    max_waiting_queries: int = 64
    """Callers waiting for a free worker; more get RESOURCE_EXHAUSTED at once."""
    max_worker_memory_bytes: int = 256 * 1024 * 1024
    """RLIMIT_AS of each query worker process (SQLite's heap is capped at half of it)."""


@dataclass(frozen=True)
class MemoryLimits:
    """Size bounds and defaults of the memory service."""

    max_message_bytes: int = 64 * 1024
    default_recent_count: int = 5
    default_max_chars: int = 100
    max_agent_id_chars: int = 128


@dataclass(frozen=True)
class Limits:
    """All per-service bounds; every value has a sensible default."""

    calculator: CalculatorLimits = field(default_factory=CalculatorLimits)
    file_reader: FileReaderLimits = field(default_factory=FileReaderLimits)
    database_query: DatabaseQueryLimits = field(default_factory=DatabaseQueryLimits)
    memory: MemoryLimits = field(default_factory=MemoryLimits)


@dataclass(frozen=True)
class MeshSettings:
    """Everything the servers (and the supervisor) need from the config file."""

    config_path: Path
    run_dir: Path
    services: Mapping[str, ServiceSettings]
    oauth: OAuthSettings
    limits: Limits = field(default_factory=Limits)
    shutdown_grace_s: float = 2.0

    def service(self, name: str) -> ServiceSettings:
        """Return one service's settings; the KeyError names the known services."""
        try:
            return self.services[name]
        except KeyError:
            raise KeyError(f"unknown service {name!r} (known: {', '.join(sorted(self.services))})") from None

    def address(self, name: str) -> str:
        """``host:port`` of one service."""
        return self.service(name).address

    def host_port(self, name: str) -> tuple[str, int]:
        """``(host, port)`` of one service."""
        return split_address(self.service(name).address)

    def with_address(self, name: str, address: str) -> MeshSettings:
        """Return a copy with one service moved (tests put services on ephemeral ports)."""
        split_address(address)
        services = dict(self.services)
        services[name] = dataclasses.replace(self.service(name), address=address)
        return dataclasses.replace(self, services=services)

    @property
    def credentials_dir(self) -> Path:
        """Generated local development credentials (see ``servers.credentials``)."""
        return self.run_dir / "credentials"

    @property
    def pid_dir(self) -> Path:
        """Pid files of the processes the supervisor started."""
        return self.run_dir / "run"

    @property
    def log_dir(self) -> Path:
        """One log file per supervised process."""
        return self.run_dir / "log"

    @property
    def data_dir(self) -> Path:
        """Generated data such as the bank database."""
        return self.run_dir / "data"

    @property
    def models_dir(self) -> Path:
        """The assembled embedded model."""
        return self.run_dir / "models"


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


class ConfigSection:
    """One mapping in the YAML, read with its key path so every error names the key and the file.

    Shared by the servers' and the orchestrator's loaders, so both halves of the
    one config file report mistakes the same way.
    """

    def __init__(self, data: Any, path: str, source: str) -> None:
        self.path = path
        self.source = source
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise self.error(f"expected a mapping, got {type(data).__name__}")
        self.data: dict[Any, Any] = data

    def error(self, message: str, key: str | None = None) -> ConfigError:
        """Build the ConfigError for ``key`` (or this section): ``file: a.b.key: message``."""
        where = self.path if key is None else (f"{self.path}.{key}" if self.path else key)
        return ConfigError(f"{self.source}: {where}: {message}")

    def only(self, *allowed: str) -> None:
        """Reject any key not in ``allowed`` (typos fail loudly instead of being ignored)."""
        for key in self.data:
            if not isinstance(key, str) or key not in allowed:
                raise self.error(f"unknown key (allowed: {', '.join(sorted(allowed))})", str(key))

    def child(self, key: str) -> ConfigSection:
        """Read the nested mapping under ``key`` (empty if absent)."""
        return ConfigSection(self.data.get(key), f"{self.path}.{key}" if self.path else key, self.source)

    def has(self, key: str) -> bool:
        """Whether ``key`` is present."""
        return key in self.data

    def string(self, key: str, default: str | None = None) -> str:
        """Read a non-blank string; required when ``default`` is None."""
        value = self._get(key, default)
        if not isinstance(value, str) or not value.strip():
            raise self.error(f"expected a non-empty string, got {value!r}", key)
        return value

    def flag(self, key: str, default: bool) -> bool:
        """Read a YAML boolean."""
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.error(f"expected true or false, got {value!r}", key)
        return value

    def number(
        self, key: str, default: float | None = None, minimum: float = 0.0, allow_zero: bool = False
    ) -> float:
        """Read a number above ``minimum`` (or equal to it with ``allow_zero``)."""
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(f"expected a number, got {value!r}", key)
        if value < minimum or (value == minimum and not allow_zero):
            raise self.error(f"must be {'at least' if allow_zero else 'greater than'} {minimum}, got {value!r}", key)
        return float(value)

    def optional_number(self, key: str) -> float | None:
        """Read a non-negative number, or None when absent."""
        return self.number(key, 0.0, allow_zero=True) if key in self.data else None

    def integer(self, key: str, default: int | None = None, minimum: int = 1) -> int:
        """Read an integer of at least ``minimum``."""
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"expected an integer, got {value!r}", key)
        if value < minimum:
            raise self.error(f"must be at least {minimum}, got {value!r}", key)
        return value

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """Read a list of non-empty strings."""
        value = self._get(key, list(default))
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            raise self.error(f"expected a list of non-empty strings, got {value!r}", key)
        return tuple(value)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        """Read one of ``choices``."""
        value = self.string(key, default)
        if value not in choices:
            raise self.error(f"expected one of {', '.join(choices)}, got {value!r}", key)
        return value

    def path_value(self, key: str, default: Path | None = None) -> Path:
        """Read a path; relative ones are under the repository root."""
        value = self._get(key, default)
        if not isinstance(value, str | Path) or not str(value):
            raise self.error(f"expected a path, got {value!r}", key)
        path = Path(value).expanduser()
        return path if path.is_absolute() else REPO_ROOT / path

    def _get(self, key: str, default: Any) -> Any:
        if key in self.data:
            return self.data[key]
        if default is None:
            raise self.error("missing required key", key)
        return default




def _read_services(section: ConfigSection) -> dict[str, ServiceSettings]:
    section.only(*SERVICE_NAMES)
    services: dict[str, ServiceSettings] = {}
    for name in SERVICE_NAMES:
        if not section.has(name):
            continue
        entry = section.child(name)
        entry.only("address", "deadline_s")
        address = entry.string("address")
        try:
            split_address(address)
        except ValueError as exc:
            raise entry.error(str(exc), "address") from None
        services[name] = ServiceSettings(address=address, deadline_s=entry.number("deadline_s", 2.0))
    for name in SERVICE_NAMES:
        if name not in services:
            raise section.error("missing required service", name)
    return services


def _read_oauth(section: ConfigSection) -> OAuthSettings:
    section.only("issuer", "audience", "token_ttl_s", "clients")
    defaults = OAuthSettings()
    clients_section = section.child("clients")
    clients: dict[str, tuple[str, ...]] = {}
    for client_id, scopes in clients_section.data.items():
        if not isinstance(client_id, str) or not client_id:
            raise clients_section.error("client id must be a non-empty string", str(client_id))
        if not isinstance(scopes, list) or not all(isinstance(s, str) and s for s in scopes):
            raise clients_section.error(f"expected a list of scope strings, got {scopes!r}", client_id)
        clients[client_id] = tuple(scopes)
    return OAuthSettings(
        issuer=section.string("issuer", defaults.issuer),
        audience=section.string("audience", defaults.audience),
        token_ttl_s=section.integer("token_ttl_s", defaults.token_ttl_s),
        clients=clients,
    )


def _read_limits(section: ConfigSection) -> Limits:
    section.only("calculator", "file_reader", "database_query", "memory")
    calc, files, db, mem = (section.child(name) for name in ("calculator", "file_reader", "database_query", "memory"))
    calc.only(*(f.name for f in dataclasses.fields(CalculatorLimits)))
    files.only(*(f.name for f in dataclasses.fields(FileReaderLimits)))
    db.only(*(f.name for f in dataclasses.fields(DatabaseQueryLimits)))
    mem.only(*(f.name for f in dataclasses.fields(MemoryLimits)))
    c, f, d, m = CalculatorLimits(), FileReaderLimits(), DatabaseQueryLimits(), MemoryLimits()
    return Limits(
        calculator=CalculatorLimits(
            max_expression_chars=calc.integer("max_expression_chars", c.max_expression_chars),
            max_exponent=calc.integer("max_exponent", c.max_exponent),
            max_integer_digits=calc.integer("max_integer_digits", c.max_integer_digits),
            max_nodes=calc.integer("max_nodes", c.max_nodes),
        ),
        file_reader=FileReaderLimits(
            documents_dir=files.path_value("documents_dir", f.documents_dir),
            max_file_bytes=files.integer("max_file_bytes", f.max_file_bytes),
            max_listed_entries=files.integer("max_listed_entries", f.max_listed_entries),
            max_folder_depth=files.integer("max_folder_depth", f.max_folder_depth, minimum=0),
        ),
        database_query=DatabaseQueryLimits(
            max_rows=db.integer("max_rows", d.max_rows),
            query_timeout_s=db.number("query_timeout_s", d.query_timeout_s),
            max_sql_chars=db.integer("max_sql_chars", d.max_sql_chars),
            max_value_bytes=db.integer("max_value_bytes", d.max_value_bytes, minimum=1024),
            max_response_bytes=db.integer("max_response_bytes", d.max_response_bytes, minimum=1024),
            max_concurrent_queries=db.integer("max_concurrent_queries", d.max_concurrent_queries),
            max_waiting_queries=db.integer("max_waiting_queries", d.max_waiting_queries, minimum=0),
            max_worker_memory_bytes=db.integer(
                "max_worker_memory_bytes", d.max_worker_memory_bytes, minimum=64 * 1024 * 1024
            ),
        ),
        memory=MemoryLimits(
            max_message_bytes=mem.integer("max_message_bytes", m.max_message_bytes),
            default_recent_count=mem.integer("default_recent_count", m.default_recent_count),
            default_max_chars=mem.integer("default_max_chars", m.default_max_chars),
            max_agent_id_chars=mem.integer("max_agent_id_chars", m.max_agent_id_chars),
        ),
    )


def load_mesh_settings(path: str | Path) -> MeshSettings:
    """Read and validate the server-side sections of the config file at ``path``."""
    config_path = Path(path)
    source = str(path)
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None
    root = ConfigSection(raw, "", source)
    mesh = root.child("mesh")
    mesh.only("run_dir", "shutdown_grace_s")
    if not root.has("services"):
        raise root.error("missing required section", "services")
    return MeshSettings(
        config_path=config_path.resolve(),
        run_dir=mesh.path_value("run_dir", Path("var")),
        shutdown_grace_s=mesh.number("shutdown_grace_s", 2.0),
        services=_read_services(root.child("services")),
        oauth=_read_oauth(root.child("oauth")),
        limits=_read_limits(root.child("limits")),
    )
