"""The few project APIs tests/deploy uses, in one place.

The deploy checks read the project's own truth (its config loaders, its
credential variables and files, its test helpers) rather than copies of it.
When those modules move, this file is the one to adapt.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf.descriptor import MethodDescriptor
from heist.auth.v1 import options_pb2 as auth_options

from orchestrator.config import load_config
from servers.credentials import (
    CLIENTS_FILE,
    CREDENTIALS_DIR_ENV,
    PUBLIC_KEY_FILE,
    PUBLIC_KEY_FILE_ENV,
    SIGNING_KEY_FILE,
    SIGNING_KEY_FILE_ENV,
    client_secret_env_var,
    ensure_dev_credentials,
    public_pem,
)
from servers.settings import load_mesh_settings
from tests.ports import free_ports
from tests.scripted_llm import Reply, ScriptedLLM, text, tool_call
from tests.server_processes import stop_processes

__all__ = [
    "CLIENTS_FILE",
    "CREDENTIALS_DIR_ENV",
    "PUBLIC_KEY_FILE",
    "PUBLIC_KEY_FILE_ENV",
    "SIGNING_KEY_FILE",
    "SIGNING_KEY_FILE_ENV",
    "Reply",
    "ScriptedLLM",
    "client_secret_env_var",
    "credentials_dir",
    "dev_credentials",
    "free_ports",
    "load_config",
    "public_pem",
    "required_scope",
    "service_ports",
    "stop_processes",
    "text",
    "tool_call",
]


def required_scope(method: MethodDescriptor) -> str | None:
    """The OAuth scope a method's contract requires (``heist.auth.v1.required_scope``), None if none."""
    scope: str = method.GetOptions().Extensions[auth_options.required_scope]
    return scope or None


def service_ports(config_path: Path) -> dict[str, int]:
    """Each service's port in a config file, as the servers read it."""
    settings = load_mesh_settings(config_path)
    return {name: settings.host_port(name)[1] for name in settings.services}


def credentials_dir(config_path: Path) -> Path:
    """Where the dev credentials of a config file live (``<run_dir>/credentials``)."""
    return load_mesh_settings(config_path).credentials_dir


def dev_credentials(config_path: Path) -> Path:
    """Generate the dev credentials for a config file's clients, as `make serve` does; return their folder."""
    return ensure_dev_credentials(load_mesh_settings(config_path))
