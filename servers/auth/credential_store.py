"""Where OAuth client secrets and the token signing key come from.

Local development: ``ensure_dev_credentials`` generates them on first start into
``<run_dir>/credentials/`` (folder 0700, files 0600, git-ignored), so a fresh
clone works without anyone handling secrets and nothing secret is ever committed:

- ``clients.json``: ``{client_id: secret}`` for every client in ``oauth.clients``
- ``signing_key.pem``: Ed25519 private key (PKCS#8) the OAuth server signs tokens with
- ``public_key.pem``: its public key, which every tool server verifies tokens with

Production: provide the secrets from your secret store through the environment;
each variable wins over the generated files:

- ``HEIST_OAUTH_CLIENT_SECRET_<CLIENT_ID>``: a client's secret; the client id is
  upper-cased and every non-alphanumeric character becomes ``_``
  (``safecracker`` -> ``HEIST_OAUTH_CLIENT_SECRET_SAFECRACKER``)
- ``HEIST_OAUTH_CLIENT_SECRETS_DIR``: a folder with one file per client (named by
  its id), for secrets mounted as files rather than passed in the environment
- ``HEIST_OAUTH_SIGNING_KEY_FILE``: path of the Ed25519 private key PEM (OAuth server only)
- ``HEIST_OAUTH_PUBLIC_KEY_FILE``: path of the matching public key PEM (tool servers)
- ``HEIST_CREDENTIALS_DIR``: use this folder instead of ``<run_dir>/credentials``

With ``security.transport: mtls`` (the default) the same first start also
generates the development CA and certificates into ``tls/`` there
(``heist_common.tls``; production: ``HEIST_TLS_CA_FILE``, ``HEIST_TLS_CERT_FILE``,
``HEIST_TLS_KEY_FILE``).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from heist_common import dev_pki, tls
from heist_common.config import HeistConfig
from heist_common.credentials import (
    CLIENT_SECRET_ENV_PREFIX,
    CLIENT_SECRETS_DIR_ENV,
    CLIENTS_FILE,
    CREDENTIALS_DIR_ENV,
    CredentialsError,
    client_secret,
    client_secret_env_var,
    credentials_dir,
    write_private,
)

__all__ = [
    "CLIENTS_FILE",
    "CLIENT_SECRETS_DIR_ENV",
    "CLIENT_SECRET_ENV_PREFIX",
    "CREDENTIALS_DIR_ENV",
    "PUBLIC_KEY_FILE_ENV",
    "SIGNING_KEY_FILE_ENV",
    "CredentialsError",
    "client_secret",
    "client_secret_env_var",
    "client_secrets",
    "credentials_dir",
    "ensure_dev_credentials",
    "ensure_dev_tls",
    "key_id",
    "public_key",
    "public_key_overridden",
    "public_pem",
    "signing_key",
    "signing_key_overridden",
]

SIGNING_KEY_FILE_ENV = "HEIST_OAUTH_SIGNING_KEY_FILE"
PUBLIC_KEY_FILE_ENV = "HEIST_OAUTH_PUBLIC_KEY_FILE"
SIGNING_KEY_FILE = "signing_key.pem"
PUBLIC_KEY_FILE = "public_key.pem"


def signing_key_overridden() -> bool:
    """Whether the signing key comes from ``HEIST_OAUTH_SIGNING_KEY_FILE`` (production) rather than dev files."""
    return bool(os.environ.get(SIGNING_KEY_FILE_ENV))


def public_key_overridden() -> bool:
    """Whether the public key comes from ``HEIST_OAUTH_PUBLIC_KEY_FILE`` (production) rather than dev files."""
    return bool(os.environ.get(PUBLIC_KEY_FILE_ENV))


def ensure_dev_credentials(config: HeistConfig) -> Path:
    """Create whatever local development credentials are missing; return their folder.

    Existing secrets and keys are kept (tokens and clients stay valid across
    restarts); a client added to the config later gets a secret added. A lock
    file serialises concurrent first starts so they never generate two keys.
    """
    return _locked(config, with_secrets=True)


def ensure_dev_tls(config: HeistConfig) -> None:
    """Create the dev CA and certificates if the mesh runs mTLS and no production CA is mounted."""
    _locked(config, with_secrets=False)


def _locked(config: HeistConfig, *, with_secrets: bool) -> Path:
    folder = credentials_dir(config)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    lock_fd = os.open(folder / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if with_secrets:
            _create_missing(config, folder)
        if tls.mtls(config) and not os.environ.get(tls.CA_FILE_ENV):
            dev_pki.ensure_dev_pki(config)
    finally:
        os.close(lock_fd)
    return folder


def _create_missing(config: HeistConfig, folder: Path) -> None:

    clients_path = folder / CLIENTS_FILE
    existing: dict[str, str] = {}
    if clients_path.exists():
        loaded = json.loads(clients_path.read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            existing = {str(k): str(v) for k, v in loaded.items()}
    wanted = {cid: existing.get(cid) or secrets.token_urlsafe(32) for cid in config.oauth.clients}
    merged = {**existing, **wanted}
    if merged != existing or not clients_path.exists():
        write_private(clients_path, (json.dumps(merged, indent=2, sort_keys=True) + "\n").encode())

    signing_path = folder / SIGNING_KEY_FILE
    public_path = folder / PUBLIC_KEY_FILE
    if not signing_path.exists():
        private = Ed25519PrivateKey.generate()
        write_private(
            signing_path,
            private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        public_path.unlink(missing_ok=True)
    if not public_path.exists():
        private_key = _load_private(signing_path)
        write_private(public_path, public_pem(private_key.public_key()).encode())


def client_secrets(config: HeistConfig) -> dict[str, str]:
    """Return the secret of every configured client (what the OAuth server checks against)."""
    return {client_id: client_secret(config, client_id) for client_id in config.oauth.clients}


def _load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise CredentialsError(f"cannot load signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CredentialsError(f"signing key {path} is not an Ed25519 key")
    return key


def _load_public(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CredentialsError(f"cannot load public key {path}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise CredentialsError(f"public key {path} is not an Ed25519 key")
    return key


def signing_key(config: HeistConfig) -> Ed25519PrivateKey:
    """Return the Ed25519 key the OAuth server signs tokens with."""
    override = os.environ.get(SIGNING_KEY_FILE_ENV)
    return _load_private(Path(override) if override else credentials_dir(config) / SIGNING_KEY_FILE)


def public_key(config: HeistConfig) -> Ed25519PublicKey:
    """Return the Ed25519 key tool servers verify tokens with."""
    override = os.environ.get(PUBLIC_KEY_FILE_ENV)
    return _load_public(Path(override) if override else credentials_dir(config) / PUBLIC_KEY_FILE)


def public_pem(key: Ed25519PublicKey) -> str:
    """Return a public key as SubjectPublicKeyInfo PEM text."""
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def key_id(key: Ed25519PublicKey) -> str:
    """Return a stable key id (the token header's ``kid``): a hash of the public key."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.urlsafe_b64encode(hashlib.sha256(raw).digest()[:12]).decode().rstrip("=")
