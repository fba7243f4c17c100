"""OAuth service: the client-credentials grant and RFC 7662 introspection as RPCs.

Why the mesh runs its own issuer: agents need short-lived tokens limited to
one tool's scope, and tool servers verify them offline with the public key
this service publishes through GetSigningKeys.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import unquote

import grpc
from heist.oauth.v1 import oauth_pb2, oauth_pb2_grpc
from prometheus_client import Counter

from heist_common.config import FailedSecretsConfig, HeistConfig
from heist_common.contract import SESSION_ID_PATTERN
from servers.auth import credential_store
from servers.auth.tokens import ALGORITHM, InvalidTokenError, TokenVerifier, issue_token
from servers.runtime import lifecycle
from servers.runtime.lifecycle import ServiceDefinition
from servers.runtime.middleware import session_id, shown

GRANT_TYPE = "client_credentials"
INTROSPECT_SCOPE = "oauth:introspect"
"""A client needs this scope to introspect tokens (RFC 7662 section 2.1: the caller is authenticated)."""
IPV6_CALLER_PREFIX = 64
"""An IPv6 peer is one caller per /64: a single host commonly holds a whole /64 and could rotate through it."""


def caller_of(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """Who is calling, for counting failed secrets: the certificate's identity (mTLS), else the peer's host.

    The port is left out on purpose: every new connection gets a new one, and
    guessing must cost as much over many connections as over one.
    """
    identities = context.peer_identities()
    if identities:
        return "cert:" + ",".join(sorted(identity.decode("utf-8", "replace") for identity in identities))
    return peer_host(context.peer() or "")


def peer_host(peer: str) -> str:
    """Return the host part of a gRPC peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``); an IPv6 host by its /64."""
    kind, _, rest = unquote(peer).partition(":")
    if kind not in ("ipv4", "ipv6"):
        return kind or "unknown"  # a Unix socket: every local caller is the same caller
    host = rest.rpartition(":")[0].strip("[]")
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return f"{kind}:{host}"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"ipv4:{address.ipv4_mapped}"
        return f"ipv6:{ipaddress.IPv6Network((address, IPV6_CALLER_PREFIX), strict=False)}"
    return f"ipv4:{address}"


class FailedSecrets:
    """Slows down guessing: after a few failed secrets a caller must wait before it may try that client again.

    Counted per (client id, caller) (``caller_of``), also for unknown client ids,
    so one caller's guessing never makes another caller's right secret wait,
    while a guesser is slowed as much over many connections as over one. The
    wait is 1, 2, 4 ... up to ``max_lockout_s`` seconds. At most ``tracked``
    records are kept (the least recently failed are forgotten first); client
    ids are kept as a fixed-size digest, so a record's size does not depend on
    what a caller sends.
    """

    def __init__(self, settings: FailedSecretsConfig) -> None:
        self._settings = settings
        self._records: OrderedDict[tuple[bytes, str], tuple[int, float]] = OrderedDict()

    @staticmethod
    def _key(client_id: str, caller: str) -> tuple[bytes, str]:
        return hashlib.blake2b(client_id.encode("utf-8", "replace"), digest_size=16).digest(), caller

    def wait_s(self, client_id: str, caller: str, now: float) -> float:
        """Seconds the caller must still wait before its secret for the client is checked again (0: go ahead)."""
        record = self._records.get(self._key(client_id, caller))
        return max(0.0, record[1] - now) if record else 0.0

    def failed(self, client_id: str, caller: str, now: float) -> bool:
        """Count a failed secret; past the free ones, lock the pair. True when this failure started a lock."""
        key = self._key(client_id, caller)
        failures = self._records.pop(key, (0, 0.0))[0] + 1
        excess = failures - self._settings.free_failures
        locked = excess > 0
        locked_until = now + min(self._settings.max_lockout_s, 2.0 ** min(excess - 1, 30)) if locked else 0.0
        self._records[key] = (failures, locked_until)
        while len(self._records) > self._settings.tracked:
            self._records.popitem(last=False)
        return locked

    def succeeded(self, client_id: str, caller: str) -> None:
        """Forget the caller's failures for the client (other callers' stay)."""
        self._records.pop(self._key(client_id, caller), None)

    def __len__(self) -> int:
        return len(self._records)


REFUSAL_REASONS = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_request",
    grpc.StatusCode.UNAUTHENTICATED: "invalid_client",
    grpc.StatusCode.PERMISSION_DENIED: "invalid_scope",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "locked_out",
}
"""Why IssueToken refused, in RFC 6749's error words (``locked_out``: too many failed secrets)."""


class TokenMetrics:
    """``heist_oauth_tokens_issued_total{client}`` (configured clients only), ``..._refused_total{reason}``.

    ``heist_oauth_lockouts_total`` has no label: which client or caller belongs in the access log, not in series.
    """

    def __init__(self, clients: Any) -> None:
        self.issued = Counter(
            "heist_oauth_tokens_issued", "Tokens issued, by OAuth client.", ("client",), registry=None
        )
        self.refused = Counter(
            "heist_oauth_tokens_refused", "IssueToken calls refused, by RFC 6749 error.", ("reason",), registry=None
        )
        self.lockouts = Counter(
            "heist_oauth_lockouts",
            "Times a caller was made to wait before trying a client's secret again (too many failed secrets).",
            registry=None,
        )
        self._issued = {client: self.issued.labels(client) for client in clients}
        self._refused = {code: self.refused.labels(reason) for code, reason in REFUSAL_REASONS.items()}

    def issue(self, client_id: str) -> None:
        """Count one issued token (only authenticated, so configured, clients get one)."""
        child = self._issued.get(client_id)
        (child or self.issued.labels("unconfigured")).inc()

    def refuse(self, code: grpc.StatusCode | None) -> None:
        """Count one refusal by its status code."""
        child = self._refused.get(code) if code is not None else None
        (child or self.refused.labels("other")).inc()


class OAuthServicer(oauth_pb2_grpc.OAuthServiceServicer):
    """Serves heist.oauth.v1.OAuthService."""

    def __init__(self, config: HeistConfig) -> None:
        if not credential_store.signing_key_overridden():  # production keys come mounted; never write beside them
            credential_store.ensure_dev_credentials(config)
        self._settings = config.oauth
        self._secrets = credential_store.client_secrets(config)
        self._signing_key = credential_store.signing_key(config)
        public = self._signing_key.public_key()
        self._verifier = TokenVerifier(public, issuer=self._settings.issuer, audience=self._settings.audience)
        self._failures = FailedSecrets(self._settings.failed_secrets)
        self._key = oauth_pb2.SigningKey(
            key_id=credential_store.key_id(public),
            algorithm=ALGORITHM,
            public_key_pem=credential_store.public_pem(public),
        )
        self.metrics = TokenMetrics(self._settings.clients)

    async def IssueToken(
        self, request: oauth_pb2.IssueTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oauth_pb2.IssueTokenResponse:
        """Authenticate the client and sign a token with the scopes it asked for (counted either way)."""
        try:
            response = await self._issue(request, context)
        except grpc.aio.AbortError:
            self.metrics.refuse(context.code())
            raise
        self.metrics.issue(request.client_id)
        return response

    async def _issue(
        self, request: oauth_pb2.IssueTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oauth_pb2.IssueTokenResponse:
        if request.grant_type != GRANT_TYPE:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unsupported grant_type {shown(request.grant_type)} (only {GRANT_TYPE!r} is supported)",
            )
        await self._authenticate(request.client_id, request.client_secret, context)
        session = session_id(context)
        if session and not SESSION_ID_PATTERN.match(session):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "x-session-id must be 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit",
            )
        allowed = self._settings.clients.get(request.client_id, ())
        requested = list(dict.fromkeys(request.scopes)) or list(allowed)
        refused = [scope for scope in requested if scope not in allowed]
        if refused:
            listed = ", ".join(shown(scope) for scope in refused[:5]) + (" ..." if len(refused) > 5 else "")
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"client {request.client_id!r} may not be granted scope(s) {listed} "
                f"(allowed: {', '.join(allowed) or 'none'})",
            )
        ttl = self._settings.token_ttl_s
        token = issue_token(
            self._signing_key,
            issuer=self._settings.issuer,
            audience=self._settings.audience,
            client_id=request.client_id,
            scopes=requested,
            ttl_s=ttl,
            session_id=session,
        )
        return oauth_pb2.IssueTokenResponse(
            access_token=token, token_type="Bearer", expires_in=ttl, scopes=requested, session_id=session
        )

    async def _authenticate(
        self, client_id: str, secret: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Check a client's secret; abort UNAUTHENTICATED (or RESOURCE_EXHAUSTED while this caller must wait).

        The wait is checked before the secret, so a waiting guesser learns
        nothing; it is this caller's own, so nobody else's guessing delays it.
        """
        if not client_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "client_id is required")
        caller = caller_of(context)
        now = time.monotonic()
        wait_s = self._failures.wait_s(client_id, caller, now)
        if wait_s > 0:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many failed secrets for this client from this caller; retry in {math.ceil(wait_s)} s",
            )
        expected = self._secrets.get(client_id)
        # Compare against a dummy for unknown clients too, so timing does not reveal which ids exist.
        matches = hmac.compare_digest(
            (expected or "\x00unknown-client").encode(), secret.encode("utf-8", "replace")
        )
        if expected is None or not matches:
            if self._failures.failed(client_id, caller, now):
                self.metrics.lockouts.inc()  # not logged: the access log has the call already
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid client credentials")
        self._failures.succeeded(client_id, caller)

    async def IntrospectToken(
        self, request: oauth_pb2.IntrospectTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oauth_pb2.IntrospectTokenResponse:
        """Report whether a token is active to an authenticated client with ``oauth:introspect``.

        An invalid token is ``active: false``, never an error.
        """
        await self._authenticate(request.client_id, request.client_secret, context)
        if INTROSPECT_SCOPE not in self._settings.clients.get(request.client_id, ()):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"client {request.client_id!r} may not introspect tokens (needs the {INTROSPECT_SCOPE!r} scope)",
            )
        try:
            claims = self._verifier.verify(request.token)
        except InvalidTokenError:
            return oauth_pb2.IntrospectTokenResponse(active=False)
        return oauth_pb2.IntrospectTokenResponse(
            active=True,
            client_id=claims.client_id,
            scopes=sorted(claims.scopes),
            expires_at=claims.expires_at,
            issued_at=claims.issued_at,
            issuer=claims.issuer,
            audience=claims.audience,
            token_type="Bearer",
            session_id=claims.session_id,
        )

    async def GetSigningKeys(
        self, request: oauth_pb2.GetSigningKeysRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oauth_pb2.GetSigningKeysResponse:
        """Publish the public key tool servers verify tokens with."""
        return oauth_pb2.GetSigningKeysResponse(
            keys=[self._key], issuer=self._settings.issuer, audience=self._settings.audience
        )


def service_definition(config: HeistConfig, limits: lifecycle.Limits) -> ServiceDefinition:
    """Build the OAuth servicer (and the dev credentials, on first start)."""
    servicer = OAuthServicer(config)
    metrics = servicer.metrics
    return ServiceDefinition("oauth", servicer, collectors=(metrics.issued, metrics.refused, metrics.lockouts))

