"""One way for tests to write a complete config file: the shipped services, a test crew, small numbers.

The service list comes from ``config/heist.yaml`` (never a hard-coded set), so a
service added there is covered by every fixture without editing tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from heist_common.layout import REPO_ROOT

SHIPPED_CONFIG = REPO_ROOT / "config" / "heist.yaml"


def shipped() -> dict[str, Any]:
    """The shipped config file as data."""
    data: dict[str, Any] = yaml.safe_load(SHIPPED_CONFIG.read_text(encoding="utf-8"))
    return data


def unattended_agents() -> list[dict[str, Any]]:
    """The shipped crew without ``require_approval``: nobody approves calls in a benchmark (docs/approvals.md)."""
    return [{key: value for key, value in agent.items() if key != "require_approval"} for agent in shipped()["agents"]]


SERVICES: tuple[str, ...] = tuple(shipped()["services"])
"""Every service of the shipped config, in start order."""
TOOLS: tuple[str, ...] = tuple(name for name in SERVICES if name not in ("oauth", "memory", "orchestrator"))

CLIENTS: dict[str, list[str]] = {
    "planner": ["simulation:read"],
    "hacker": ["file_reader:use"],
    "safecracker": ["calculator:use"],
    "mole": ["database_query:use"],
    "crew": ["calculator:use", "file_reader:use", "database_query:use"],
    "orchestrator": ["memory:read", "memory:write"],
    "admin": ["memory:read", "memory:write", "memory:admin", "oauth:introspect"],
    # callers of the orchestrator service (`orchestrator serve`): two tenants, and one that may only read
    "alice": ["heist:run", "heist:read"],
    "bob": ["heist:run", "heist:read"],
    "reader": ["heist:read"],
}
"""OAuth clients of the tests: one per agent, ``crew`` with every tool scope, the orchestrator, an admin."""

CREW: list[dict[str, Any]] = [
    {"name": "planner", "role": "Mastermind", "system_prompt": "You plan the heist.", "scopes": ["simulation:read"]},
    {"name": "hacker", "role": "Hacker", "system_prompt": "You read the documents.", "tools": ["file_reader"]},
    {"name": "safecracker", "role": "Safecracker", "system_prompt": "You do the numbers.", "tools": ["calculator"]},
    {
        "name": "mole",
        "role": "Inside Man",
        "system_prompt": "You query the bank database.",
        "tools": ["database_query"],
        "is_saboteur": True,
    },
]
"""The tests' own crew (the shipped crew's prompts can change without breaking tests)."""


def heist_config(
    tmp_path: Path,
    *,
    llm_base_url: str = "http://127.0.0.1:9/v1",
    token_ttl_s: int = 900,
    addresses: dict[str, str] | None = None,
    metrics_addresses: dict[str, str] | None = None,
    deadlines: dict[str, float] | None = None,
    limits: dict[str, dict[str, Any]] | None = None,
    server_bounds: dict[str, Any] | None = None,
    memory_store: str | None = None,
    transport: str = "mtls",
    replicas: dict[str, int] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A complete config as data; ``sections`` replace whole top-level sections.

    ``addresses`` places services (default: an unused port, for tests that start
    them elsewhere); ``metrics_addresses`` gives services a Prometheus endpoint
    (default: none); ``deadlines`` sets callers' deadlines (default 1 s);
    ``limits`` sets ``services.<name>.limits``; ``server_bounds`` every service's ``server`` section;
    ``memory_store`` the memory service's store URL (Redis); ``transport`` is
    ``security.transport`` (mTLS by default, as shipped); ``replicas`` sets
    ``services.<name>.replicas``.
    """
    services: dict[str, Any] = {}
    for name in SERVICES:
        services[name] = {
            "address": (addresses or {}).get(name, "127.0.0.1:1"),
            "deadline_s": (deadlines or {}).get(name, 1.0),
        }
        if metrics_addresses and name in metrics_addresses:
            services[name]["metrics_address"] = metrics_addresses[name]
        if limits and name in limits:
            services[name]["limits"] = limits[name]
        if server_bounds:
            services[name]["server"] = dict(server_bounds)
        if replicas and name in replicas:
            services[name]["replicas"] = replicas[name]
    if memory_store:
        services["memory"]["store"] = memory_store
    config: dict[str, Any] = {
        "mesh": {"run_dir": str(tmp_path / "run"), "shutdown_grace_s": 0.2},
        "services": services,
        "oauth": {"issuer": "heist-oauth", "audience": "heist-mesh", "token_ttl_s": token_ttl_s, "clients": CLIENTS},
        "agents": CREW,
        "llm": {"base_url": llm_base_url, "timeout_s": 2, "max_retries": 0, "tool_calling": "inline"},
        "session": {"max_turns": 4},
        "database": {"url": f"sqlite:///{tmp_path / 'audit.db'}"},
        "resilience": {
            "health_timeout_s": 0.5,
            "grpc_retry": {"max_attempts": 2, "initial_backoff_s": 0.01, "max_backoff_s": 0.05},
            "circuit_breaker": {"failure_threshold": 2, "reset_timeout_s": 0.5},
        },
        "security": {"transport": transport},
    }
    config.update(sections)
    return config


def write_heist_config(tmp_path: Path, name: str = "heist.yaml", **options: Any) -> Path:
    """Write ``heist_config(tmp_path, **options)`` to ``tmp_path / name``; return the path."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump(heist_config(tmp_path, **options), sort_keys=False))
    return path
