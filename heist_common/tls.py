"""Mutual TLS for every gRPC hop: the one place servers, the orchestrator and tests get their credentials.

Why here (``heist_common``): servers and clients must agree on the same files,
and the orchestrator may not import ``servers``. ``security.transport: mtls``
(the default) makes every server require a client certificate from the mesh CA
and every client verify the server's; ``plaintext`` is the explicit opt-out
(e.g. behind a mesh sidecar that already does mTLS).

Local development: ``heist_common.dev_pki.ensure_dev_pki`` (called by
``servers.auth.credential_store`` on first ``make serve``) writes into
``<run_dir>/credentials/tls/``:

- ``ca.crt`` / ``ca.key``: the development CA (ECDSA P-256, 10 years)
- ``<service>.crt`` / ``<service>.key``: one server certificate per service, whose
  only SAN is the service's own name (``server_name``: ``file_reader`` ->
  ``file-reader.heist.internal``)
- ``orchestrator``, ``grpcurl``, ``supervisor`` ``.crt`` / ``.key``: client certificates

Service identity: a certificate from the mesh CA is not enough, it must be the
certificate of the service dialled. Every client names the service it calls
(``service=`` below) and gRPC checks the server certificate against
``server_name(service)`` (``grpc.ssl_target_name_override``), never against
the address: otherwise any service's certificate (all of them are on the same
hosts) would pass for any other, and a fake OAuth server with the file
reader's certificate would receive the agents' client secrets.

Production: mount your own and point at them; each variable wins over the files:

- ``HEIST_TLS_CA_FILE``: CA bundle that peers' certificates must chain to
- ``HEIST_TLS_CERT_FILE`` / ``HEIST_TLS_KEY_FILE``: this process's own certificate and key

(a server's certificate must carry the DNS SAN ``server_name(service)``).

Rotation: a server re-reads its three files when one of them changes (checked
on each new connection, before its handshake), so a renewed certificate (cert-manager
updating a mounted Secret, or a new dev certificate) is served without a restart.
Connections already open keep the certificate they were made with; a half-written
or mismatched pair is ignored until it is whole.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from heist_common.config import HeistConfig
from heist_common.credentials import CredentialsError, credentials_dir

__all__ = [
    "CA_FILE_ENV",
    "CERT_FILE_ENV",
    "CLIENT_IDENTITIES",
    "GATEWAY_HTTPS_IDENTITY",
    "KEY_FILE_ENV",
    "SERVICE_DOMAIN",
    "RotatingServerCertificate",
    "TlsMaterial",
    "aio_channel",
    "channel_credentials",
    "client_material",
    "identity_files",
    "mtls",
    "server_credentials",
    "server_material",
    "server_name",
    "ssl_client_context",
    "sync_channel",
    "tls_dir",
]

log = logging.getLogger("heist.tls")

CA_FILE_ENV = "HEIST_TLS_CA_FILE"
CERT_FILE_ENV = "HEIST_TLS_CERT_FILE"
KEY_FILE_ENV = "HEIST_TLS_KEY_FILE"
CLIENT_IDENTITIES = ("orchestrator", "grpcurl", "supervisor", "mcp_gateway")
"""Client certificates the dev PKI issues: the orchestrator, grpcurl by hand, ``make serve/status`` probes,
and the MCP gateway (which calls the tool services as itself)."""
GATEWAY_HTTPS_IDENTITY = "mcp_gateway_https"
"""The MCP gateway's HTTPS server certificate: ``server_name("mcp_gateway")`` and the host it listens on.

Why the host too (unlike the gRPC services): MCP clients dial the gateway by URL and check the
certificate against that host; no mesh service dials the gateway, so the name is not one a service could
borrow to pass for another."""
SERVICE_DOMAIN = "heist.internal"
"""DNS suffix of the names services' certificates carry; never resolved, only checked against the certificate."""


def server_name(service: str) -> str:
    """Return the name ``service``'s certificate carries and its clients expect.

    ``file_reader`` -> ``file-reader.heist.internal``. Underscores become hyphens:
    a DNS label may not have them, and TLS name checks follow DNS rules.
    """
    return f"{service.replace('_', '-')}.{SERVICE_DOMAIN}"


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


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CredentialsError(
            f"mTLS {what} {path}: {exc.strerror or exc} (run 'make serve' once to generate dev certificates, "
            f"set {CA_FILE_ENV}/{CERT_FILE_ENV}/{KEY_FILE_ENV}, or set security.transport: plaintext)"
        ) from None


def _paths(config: HeistConfig, identity: str) -> tuple[Path, Path, Path]:
    """Return the CA, certificate and key files of ``identity`` (each ``HEIST_TLS_*`` variable wins)."""
    folder = tls_dir(config)
    ca = Path(os.environ.get(CA_FILE_ENV) or folder / "ca.crt")
    cert = Path(os.environ.get(CERT_FILE_ENV) or folder / f"{identity}.crt")
    key = Path(os.environ.get(KEY_FILE_ENV) or folder / f"{identity}.key")
    return ca, cert, key


def identity_files(config: HeistConfig, identity: str) -> tuple[Path, Path, Path]:
    """Return the CA, certificate and key files of ``identity`` (each ``HEIST_TLS_*`` variable wins)."""
    return _paths(config, identity)


def _material(config: HeistConfig, identity: str) -> TlsMaterial:
    ca, cert, key = _paths(config, identity)
    return TlsMaterial(_read(ca, "CA"), _read(cert, "certificate"), _read(key, "key"))


def _pair_matches(material: TlsMaterial) -> bool:
    """Whether the key belongs to the certificate (a rotation may have replaced only one of them so far)."""
    try:
        cert = x509.load_pem_x509_certificate(material.cert)
        key = serialization.load_pem_private_key(material.key, password=None)
        x509.load_pem_x509_certificates(material.ca)
    except (ValueError, TypeError):
        return False
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki))


class RotatingServerCertificate:
    """A server's certificate configuration that follows its files: gRPC asks before every handshake.

    ``fetch`` (the ``certificate_configuration_fetcher``) compares the files'
    (inode, size, mtime) with the last ones loaded and re-reads them only when
    they changed; a set that is unreadable or whose key does not match the
    certificate is skipped (the previous configuration stays) and tried again
    on the next connection, so a rotation caught half-way costs nothing.
    """

    def __init__(self, config: HeistConfig, service: str) -> None:
        self.service = service
        self.paths = _paths(config, service)
        self._lock = threading.Lock()  # gRPC may call fetch from several threads at once
        self._stamp = self._stat()
        self.material = _material(config, service)
        self.reloads = 0
        """Certificate sets loaded since the start (tests and logs)."""

    def _stat(self) -> tuple[tuple[int, int, int], ...] | None:
        try:
            stats = [path.stat() for path in self.paths]  # follows symlinks: a Secret volume swaps ..data
        except OSError:
            return None
        return tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in stats)

    def initial(self) -> grpc.ServerCertificateConfiguration:
        """Return the configuration the server starts with."""
        return self._configuration(self.material)

    @staticmethod
    def _configuration(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(material.key, material.cert)], root_certificates=material.ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Return a new configuration if the files changed into a whole, matching set; None keeps the current one."""
        with self._lock:
            stamp = self._stat()
            if stamp is None or stamp == self._stamp:
                return None
            try:
                material = TlsMaterial(*(path.read_bytes() for path in self.paths))
            except OSError:
                return None
            if not _pair_matches(material):
                return None
            if self._stat() != stamp:
                return None  # changed while being read: take it on the next connection
            self._stamp = stamp
            self.material = material
            self.reloads += 1
        log.info("%s: loaded its rotated TLS certificate from %s", self.service, self.paths[1])
        return self._configuration(material)


def server_material(config: HeistConfig, service: str) -> TlsMaterial:
    """Load the CA, certificate and key a service's server presents (every replica shares them)."""
    return _material(config, service)


def client_material(config: HeistConfig, identity: str = "orchestrator") -> TlsMaterial:
    """Load the CA, certificate and key a client presents (``orchestrator``, ``grpcurl``, ``supervisor``)."""
    return _material(config, identity)


def server_credentials(config: HeistConfig, service: str) -> grpc.ServerCredentials:
    """Server credentials that require, and verify against the mesh CA, a client certificate.

    They follow the files (``RotatingServerCertificate``): a renewed certificate is served without a restart.
    """
    rotating = RotatingServerCertificate(config, service)
    # grpc documents None as "keep the current configuration"; its type stubs leave None out.
    fetcher = cast("Callable[[], grpc.ServerCertificateConfiguration]", rotating.fetch)
    return grpc.dynamic_ssl_server_credentials(rotating.initial(), fetcher, require_client_authentication=True)


def channel_credentials(config: HeistConfig, identity: str = "orchestrator") -> grpc.ChannelCredentials:
    """Channel credentials presenting ``identity``'s certificate and trusting only the mesh CA."""
    material = client_material(config, identity)
    return grpc.ssl_channel_credentials(material.ca, material.key, material.cert)


def _options(options: Sequence[tuple[str, Any]], service: str) -> list[tuple[str, Any]]:
    return [*options, ("grpc.ssl_target_name_override", server_name(service))]


def aio_channel(
    config: HeistConfig,
    target: str,
    options: Sequence[tuple[str, Any]] = (),
    *,
    service: str,
    identity: str = "orchestrator",
) -> grpc.aio.Channel:
    """Open an asyncio channel to ``service`` at ``target`` with the config's transport.

    Under mTLS the server must present ``service``'s own certificate (``server_name``),
    whatever address ``target`` names (a host, or a multi-address ``ipv4:`` list).
    """
    if not mtls(config):
        return grpc.aio.insecure_channel(target, options=list(options))
    creds = channel_credentials(config, identity)
    return grpc.aio.secure_channel(target, creds, options=_options(options, service))


def sync_channel(
    config: HeistConfig,
    target: str,
    options: Sequence[tuple[str, Any]] = (),
    *,
    service: str,
    identity: str = "orchestrator",
) -> grpc.Channel:
    """Open a blocking channel to ``service`` at ``target`` with the config's transport (see ``aio_channel``)."""
    if not mtls(config):
        return grpc.insecure_channel(target, options=list(options))
    creds = channel_credentials(config, identity)
    return grpc.secure_channel(target, creds, options=_options(options, service))


def ssl_client_context(config: HeistConfig, identity: str = "orchestrator") -> ssl.SSLContext:
    """Build a Python ``ssl`` context for raw HTTP/2 clients (ALPN h2, mesh CA, client certificate).

    Wrap sockets with ``server_hostname=server_name(service)``: the host name check is what ties the
    certificate to the service.
    """
    folder = tls_dir(config)
    cafile = os.environ.get(CA_FILE_ENV) or folder / "ca.crt"
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    context.load_cert_chain(
        os.environ.get(CERT_FILE_ENV) or folder / f"{identity}.crt",
        os.environ.get(KEY_FILE_ENV) or folder / f"{identity}.key",
    )
    context.set_alpn_protocols(["h2"])
    return context
