"""The few project APIs tests/deploy uses, in one place.

The deploy checks read the project's own truth (its config loader, its
credential variables and files, its test helpers) rather than copies of it.
When those modules move, this file is the one to adapt.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf.descriptor import MethodDescriptor
from heist.auth.v1 import options_pb2 as auth_options

from heist_common.config import load_config
from servers.auth.credential_store import (
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
from tests.support.ports import free_ports
from tests.support.processes import stop_processes
from tests.support.scripted_llm import Reply, ScriptedLLM, text, tool_call

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
    scope: str = method.GetOptions().Extensions[auth_options.required_scope]
    return scope or None


def service_ports(config_path: Path) -> dict[str, int]:
    config = load_config(config_path)
    return {name: int(service.address.rpartition(":")[2]) for name, service in config.services.items()}


def credentials_dir(config_path: Path) -> Path:
    return load_config(config_path).mesh.credentials_dir


def dev_credentials(config_path: Path) -> Path:
    return ensure_dev_credentials(load_config(config_path))
