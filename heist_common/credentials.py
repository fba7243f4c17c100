"""Where an OAuth client finds its secret: an environment variable, a mounted file, else the generated dev file.

Both sides need this and nothing more of each other's credentials: the
orchestrator reads its agents' client secrets to ask for tokens, the OAuth
server reads every secret to check them. Signing keys stay with the servers
(``servers.auth.credential_store``).

- ``HEIST_OAUTH_CLIENT_SECRET_<CLIENT_ID>``: a client's secret; the client id is
  upper-cased and every non-alphanumeric character becomes ``_``
  (``safecracker`` -> ``HEIST_OAUTH_CLIENT_SECRET_SAFECRACKER``)
- ``HEIST_OAUTH_CLIENT_SECRETS_DIR``: a folder with one file per client, named by
  the client id and holding its secret (a Kubernetes Secret mounted as a volume,
  key = client id): secrets stay out of the environment, which child processes,
  crash reports and ``/proc/<pid>/environ`` can see
- ``HEIST_CREDENTIALS_DIR``: use this folder instead of ``<run_dir>/credentials``

Each source wins over the ones after it: the variable, the folder's file, ``clients.json``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from heist_common.config import HeistConfig

CREDENTIALS_DIR_ENV = "HEIST_CREDENTIALS_DIR"
CLIENT_SECRET_ENV_PREFIX = "HEIST_OAUTH_CLIENT_SECRET_"
CLIENTS_FILE = "clients.json"
CLIENT_SECRETS_DIR_ENV = "HEIST_OAUTH_CLIENT_SECRETS_DIR"
MAX_SECRET_FILE_BYTES = 4096
"""A client secret is a few dozen characters; a bigger file is the wrong file."""


class CredentialsError(RuntimeError):
    """A secret or key is missing or unreadable."""


def credentials_dir(config: HeistConfig) -> Path:
    """Return the folder holding the credentials (``HEIST_CREDENTIALS_DIR`` wins)."""
    override = os.environ.get(CREDENTIALS_DIR_ENV)
    return Path(override) if override else config.mesh.credentials_dir


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` readable by the owner only, without a window where it is world-readable.

    Written to a temporary file first and renamed, so a reader never sees half a key;
    ``chmod`` as well, because ``O_CREAT`` keeps the mode of a stale temporary file.
    """
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def client_secret_env_var(client_id: str) -> str:
    """Return the environment variable that overrides one client's secret."""
    return CLIENT_SECRET_ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", client_id).upper()


def _secret_from_dir(folder: Path, client_id: str) -> str | None:
    """Read the secret in ``folder/<client_id>`` (one trailing newline dropped); None if there is no such file."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", client_id):
        return None  # never a path outside the folder
    path = folder / client_id
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_SECRET_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CredentialsError(f"cannot read the secret of client {client_id!r} from {path}: {exc.strerror}") from None
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise CredentialsError(f"{path}: more than {MAX_SECRET_FILE_BYTES} bytes, not a client secret")
    try:
        secret = data.decode("utf-8").removesuffix("\n")
    except UnicodeDecodeError:
        raise CredentialsError(f"{path}: the secret of client {client_id!r} is not UTF-8") from None
    if not secret:
        raise CredentialsError(f"{path}: the secret of client {client_id!r} is empty")
    return secret


def client_secret(config: HeistConfig, client_id: str) -> str:
    """Return one client's secret: the environment variable, else the secrets folder's file, else clients.json."""
    from_env = os.environ.get(client_secret_env_var(client_id))
    if from_env:
        return from_env
    secrets_dir = os.environ.get(CLIENT_SECRETS_DIR_ENV)
    if secrets_dir:
        from_file = _secret_from_dir(Path(secrets_dir), client_id)
        if from_file is not None:
            return from_file
    path = credentials_dir(config) / CLIENTS_FILE
    try:
        secrets_by_client = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CredentialsError(
            f"no secret for client {client_id!r}: set {client_secret_env_var(client_id)} or start the oauth "
            f"server once to generate {path} ({exc})"
        ) from None
    secret = secrets_by_client.get(client_id) if isinstance(secrets_by_client, dict) else None
    if not isinstance(secret, str) or not secret:
        raise CredentialsError(f"no secret for client {client_id!r} in {path}")
    return secret
