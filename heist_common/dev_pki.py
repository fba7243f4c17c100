"""The development PKI: a CA and one certificate per service and client identity, generated on first start.

Why apart from ``heist_common.tls``: generating certificates needs ``cryptography``
(a twentieth of a second to import), which the processes that only *read*
certificates (every ``orchestrator`` command) should not load. See
``heist_common.tls`` for where the files go and how production files replace them.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from heist_common.config import HeistConfig
from heist_common.credentials import CredentialsError, write_private
from heist_common.tls import CLIENT_IDENTITIES, GATEWAY_HTTPS_IDENTITY, server_name, tls_dir

__all__ = ["ensure_dev_pki", "issue_certificate", "load_ca", "new_ca", "server_names"]

CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=365)


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


def server_names(service: str) -> list[str]:
    """SANs of a service's certificate: its own name only (``heist_common.tls.server_name``).

    No address and no ``localhost``: every service runs on the same hosts, so a
    name they share would let any service's certificate pass for any other.
    """
    return [server_name(service)]


def _names_exactly(cert_path: Path, names: Sequence[str]) -> bool:
    """Whether an existing server certificate carries exactly ``names``.

    A certificate from an older version (SANs ``127.0.0.1``, ``localhost``...,
    which every service shared) or for a renamed service fails this and is
    reissued by our own CA on the next start.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    have = {str(v) for v in sans.get_values_for_type(x509.IPAddress)} | set(sans.get_values_for_type(x509.DNSName))
    return have == set(names)


def ensure_dev_pki(config: HeistConfig) -> Path:
    """Create the dev CA and whatever certificates are missing; keep existing ones (the caller holds the lock)."""
    folder = tls_dir(config)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    if not (folder / "ca.crt").exists() or not (folder / "ca.key").exists():
        ca_cert, ca_key = new_ca()
        write_private(folder / "ca.key", _key_pem(ca_key))
        write_private(folder / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
        for stale in folder.glob("*.crt"):
            if stale.name != "ca.crt":
                stale.unlink()
    ca_cert, ca_key = load_ca(config)
    leaves: dict[str, list[str]] = {name: server_names(name) for name in config.services}
    leaves.update({name: [] for name in CLIENT_IDENTITIES})
    if config.mcp_gateway is not None:
        leaves[GATEWAY_HTTPS_IDENTITY] = [*server_names("mcp_gateway"), config.mcp_gateway.host]
    for name, names in leaves.items():
        cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
        if cert_path.exists() and key_path.exists() and (not names or _names_exactly(cert_path, names)):
            continue
        cert_pem, key_pem = issue_certificate(ca_cert, ca_key, name, server_names=names)
        write_private(key_path, key_pem)
        write_private(cert_path, cert_pem)
    return folder
