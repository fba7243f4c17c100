"""Mutual TLS for every gRPC hop: the one place servers, the orchestrator and tests get their credentials.

Why here (``heist_common``): servers and clients must agree on the same files,
and the orchestrator may not import ``servers``. ``security.transport: mtls``
(the default) makes every server require a client certificate from the mesh CA
and every client verify the server's; ``plaintext`` is the explicit opt-out
(e.g. behind a mesh sidecar that already does mTLS).

Local development: ``ensure_dev_pki`` (called by ``servers.credentials``
on first ``make serve``) writes into ``<run_dir>/credentials/tls/``:

- ``ca.crt`` / ``ca.key``: the development CA (ECDSA P-256, 10 years)
- ``<service>.crt`` / ``<service>.key``: one server certificate per service, with
  SANs for its configured host, ``localhost``, ``127.0.0.1`` and the service name
- ``orchestrator``, ``grpcurl``, ``supervisor`` ``.crt`` / ``.key``: client certificates

Production: mount your own and point at them; each variable wins over the files:

- ``HEIST_TLS_CA_FILE``: CA bundle that peers' certificates must chain to
- ``HEIST_TLS_CERT_FILE`` / ``HEIST_TLS_KEY_FILE``: this process's own certificate and key
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from heist_common.config import HeistConfig
from heist_common.credentials import CredentialsError, credentials_dir

__all__ = [
    "CA_FILE_ENV",
    "CERT_FILE_ENV",
    "CLIENT_IDENTITIES",
    "KEY_FILE_ENV",
    "TlsMaterial",
    "aio_channel",
    "channel_credentials",
    "client_material",
    "ensure_dev_pki",
    "issue_certificate",
    "mtls",
    "server_credentials",
    "server_material",
    "ssl_client_context",
    "sync_channel",
    "tls_dir",
]

CA_FILE_ENV = "HEIST_TLS_CA_FILE"
CERT_FILE_ENV = "HEIST_TLS_CERT_FILE"
KEY_FILE_ENV = "HEIST_TLS_KEY_FILE"
CLIENT_IDENTITIES = ("orchestrator", "grpcurl", "supervisor")
"""Client certificates the dev PKI issues: the orchestrator, grpcurl by hand, ``make serve/status`` probes."""
CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=365)
LOCAL_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes of one identity: the CA it trusts, its certificate chain and private key."""

    ca: bytes
    cert: bytes
    key: bytes


def mtls(config: HeistConfig) -> bool:
    """Whether this mesh runs mutual TLS (the default) rather than plaintext."""
    return config.security.transport == "mtls"


def tls_dir(config: HeistConfig) -> Path:
    """Folder of the generated dev PKI."""
    return credentials_dir(config) / "tls"


# -- generation (dev only) -------------------------------------------------------------------


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    encoding, private_format = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(encoding, private_format, serialization.NoEncryption())


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def issue_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    server_names: Sequence[str] = (),
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[bytes, bytes]:
    """Sign a leaf certificate; a server one when ``server_names`` (its SANs) is given, else a client one.

    Returns (certificate PEM, key PEM). Tests use the validity bounds to make expired certificates.
    """
    key = _new_key()
    now = datetime.datetime.now(datetime.UTC)
    start = not_before or now - datetime.timedelta(minutes=5)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(not_after or now + LEAF_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server_names:
        builder = builder.add_extension(_san(server_names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def new_ca(common_name: str = "heist mesh development CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Create a self-signed CA (the dev CA, or another CA in tests that must be refused)."""
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def load_ca(config: HeistConfig) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load the generated dev CA and its key (tests sign extra certificates with it)."""
    folder = tls_dir(config)
    cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialsError(f"{folder / 'ca.key'} is not an EC key")
    return cert, key


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def server_names(config: HeistConfig, service: str) -> list[str]:
    """SANs of a service's certificate: its configured host, the loopback names and the service name."""
    host = config.service(service).host
    names = [*LOCAL_NAMES, service]
    if host not in ("0.0.0.0", "::", ""):
        names.insert(0, host)
    return names


def _covers(cert_path: Path, names: Sequence[str]) -> bool:
    """Whether an existing server certificate still names every host it must (the config may have moved it)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    have = {str(v) for v in sans.get_values_for_type(x509.IPAddress)} | set(sans.get_values_for_type(x509.DNSName))
    return set(names) <= have


def ensure_dev_pki(config: HeistConfig) -> Path:
    """Create the dev CA and whatever certificates are missing; keep existing ones (the caller holds the lock)."""
    folder = tls_dir(config)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    if not (folder / "ca.crt").exists() or not (folder / "ca.key").exists():
        ca_cert, ca_key = new_ca()
        _write_private(folder / "ca.key", _key_pem(ca_key))
        _write_private(folder / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
        for stale in folder.glob("*.crt"):
            if stale.name != "ca.crt":
                stale.unlink()
    ca_cert, ca_key = load_ca(config)
    leaves: dict[str, list[str]] = {name: server_names(config, name) for name in config.services}
    leaves.update({name: [] for name in CLIENT_IDENTITIES})
    for name, names in leaves.items():
        cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
        if cert_path.exists() and key_path.exists() and (not names or _covers(cert_path, names)):
            continue
        cert_pem, key_pem = issue_certificate(ca_cert, ca_key, name, server_names=names)
        _write_private(key_path, key_pem)
        _write_private(cert_path, cert_pem)
    return folder


# -- loading (servers and clients) ----------------------------------------------------------


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CredentialsError(
            f"mTLS {what} {path}: {exc.strerror or exc} (run 'make serve' once to generate dev certificates, "
            f"set {CA_FILE_ENV}/{CERT_FILE_ENV}/{KEY_FILE_ENV}, or set security.transport: plaintext)"
        ) from None


def _material(config: HeistConfig, identity: str) -> TlsMaterial:
    folder = tls_dir(config)
    ca = Path(os.environ.get(CA_FILE_ENV) or folder / "ca.crt")
    cert = Path(os.environ.get(CERT_FILE_ENV) or folder / f"{identity}.crt")
    key = Path(os.environ.get(KEY_FILE_ENV) or folder / f"{identity}.key")
    return TlsMaterial(_read(ca, "CA"), _read(cert, "certificate"), _read(key, "key"))


def server_material(config: HeistConfig, service: str) -> TlsMaterial:
    """Load the CA, certificate and key a service's server presents (every replica shares them)."""
    return _material(config, service)


def client_material(config: HeistConfig, identity: str = "orchestrator") -> TlsMaterial:
    """Load the CA, certificate and key a client presents (``orchestrator``, ``grpcurl``, ``supervisor``)."""
    return _material(config, identity)


def server_credentials(config: HeistConfig, service: str) -> grpc.ServerCredentials:
    """Server credentials that require, and verify against the mesh CA, a client certificate."""
    material = server_material(config, service)
    return grpc.ssl_server_credentials(
        [(material.key, material.cert)], root_certificates=material.ca, require_client_auth=True
    )


def channel_credentials(config: HeistConfig, identity: str = "orchestrator") -> grpc.ChannelCredentials:
    """Channel credentials presenting ``identity``'s certificate and trusting only the mesh CA."""
    material = client_material(config, identity)
    return grpc.ssl_channel_credentials(material.ca, material.key, material.cert)


def _options(options: Sequence[tuple[str, Any]], server_name: str | None) -> list[tuple[str, Any]]:
    extra = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return [*options, *extra]


def aio_channel(
    config: HeistConfig,
    target: str,
    options: Sequence[tuple[str, Any]] = (),
    *,
    identity: str = "orchestrator",
    server_name: str | None = None,
) -> grpc.aio.Channel:
    """Open an asyncio channel to ``target`` with the config's transport.

    ``server_name`` is the name the server certificate must carry, needed when
    ``target`` is not a plain ``host:port`` (a multi-address ``ipv4:`` list).
    """
    if not mtls(config):
        return grpc.aio.insecure_channel(target, options=list(options))
    creds = channel_credentials(config, identity)
    return grpc.aio.secure_channel(target, creds, options=_options(options, server_name))


def sync_channel(
    config: HeistConfig,
    target: str,
    options: Sequence[tuple[str, Any]] = (),
    *,
    identity: str = "orchestrator",
    server_name: str | None = None,
) -> grpc.Channel:
    """Open a blocking channel to ``target`` with the config's transport (see ``aio_channel``)."""
    if not mtls(config):
        return grpc.insecure_channel(target, options=list(options))
    creds = channel_credentials(config, identity)
    return grpc.secure_channel(target, creds, options=_options(options, server_name))


def ssl_client_context(config: HeistConfig, identity: str = "orchestrator") -> ssl.SSLContext:
    """Build a Python ``ssl`` context for raw HTTP/2 clients (ALPN h2, mesh CA, client certificate)."""
    folder = tls_dir(config)
    cafile = os.environ.get(CA_FILE_ENV) or folder / "ca.crt"
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    context.load_cert_chain(
        os.environ.get(CERT_FILE_ENV) or folder / f"{identity}.crt",
        os.environ.get(KEY_FILE_ENV) or folder / f"{identity}.key",
    )
    context.set_alpn_protocols(["h2"])
    return context
