"""Signing and verifying the mesh's bearer tokens (JWT, EdDSA/Ed25519).

Why local verification: every tool server checks signature, expiry, issuer and
audience itself with the OAuth server's public key, so a tool call needs no
extra round trip and keeps working while the OAuth server restarts.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from servers.auth.credential_store import key_id

ALGORITHM = "EdDSA"
LEEWAY_S = 5
"""Clock skew tolerated on ``exp``/``iat`` between processes."""


@dataclass(frozen=True)
class TokenClaims:
    """The verified claims of one token that the servers use."""

    client_id: str
    scopes: frozenset[str]
    issuer: str
    audience: str
    issued_at: int
    expires_at: int
    token_id: str
    session_id: str = ""
    """The ``sid`` claim: the session the token is bound to ('' when not bound)."""


class InvalidTokenError(Exception):
    """A token failed verification; ``reason`` is a short word for logs and messages."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def issue_token(
    key: Ed25519PrivateKey,
    *,
    issuer: str,
    audience: str,
    client_id: str,
    scopes: list[str],
    ttl_s: int,
    now: float | None = None,
    session_id: str = "",
) -> str:
    """Sign a token for ``client_id`` carrying ``scopes`` (space-separated ``scope`` claim), bound to a session."""
    issued_at = int(time.time() if now is None else now)
    claims = {
        "iss": issuer,
        "aud": audience,
        "sub": client_id,
        "scope": " ".join(scopes),
        "iat": issued_at,
        "exp": issued_at + ttl_s,
        "jti": uuid.uuid4().hex,
    }
    if session_id:
        claims["sid"] = session_id
    return jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": key_id(key.public_key())})


class TokenVerifier:
    """Verifies tokens against one public key, issuer and audience.

    Verified tokens are cached (bounded) because agents reuse one token for many
    calls and an Ed25519 verification is the most expensive part of a tool call;
    expiry is still checked on every use.
    """

    def __init__(self, key: Ed25519PublicKey, *, issuer: str, audience: str, cache_size: int = 1024) -> None:
        self._key = key
        self._kid = key_id(key)
        self._issuer = issuer
        self._audience = audience
        self._cache_size = cache_size
        self._cache: OrderedDict[str, TokenClaims] = OrderedDict()

    def verify(self, token: str, now: float | None = None) -> TokenClaims:
        """Return the token's claims, or raise InvalidTokenError saying what is wrong."""
        current = time.time() if now is None else now
        cached = self._cache.get(token)
        if cached is not None:
            if cached.expires_at + LEEWAY_S <= current:
                self._cache.pop(token, None)
                raise InvalidTokenError("expired", "token has expired")
            return cached
        claims = self._decode(token, current)
        self._cache[token] = claims
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return claims

    def _decode(self, token: str, now: float) -> TokenClaims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidTokenError("malformed", "token is not a well-formed JWT") from None
        if header.get("alg") != ALGORITHM:
            raise InvalidTokenError("malformed", f"token algorithm {header.get('alg')!r} is not {ALGORITHM}")
        kid = header.get("kid")
        if kid is not None and kid != self._kid:
            raise InvalidTokenError("unknown_key", f"token was signed by an unknown key (kid {kid!r})")
        try:
            payload = jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                leeway=LEEWAY_S,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidTokenError("expired", "token has expired") from None
        except jwt.InvalidSignatureError:
            raise InvalidTokenError("bad_signature", "token signature is invalid") from None
        except jwt.InvalidIssuerError:
            raise InvalidTokenError("wrong_issuer", f"token issuer is not {self._issuer!r}") from None
        except jwt.InvalidAudienceError:
            raise InvalidTokenError("wrong_audience", f"token audience is not {self._audience!r}") from None
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidTokenError("malformed", f"token lacks the {exc.claim!r} claim") from None
        except jwt.PyJWTError as exc:
            raise InvalidTokenError("malformed", f"token is invalid: {exc}") from None
        scope = payload.get("scope", "")
        sub = payload.get("sub")
        sid = payload.get("sid", "")
        if not isinstance(scope, str) or not isinstance(sub, str) or not sub or not isinstance(sid, str):
            raise InvalidTokenError("malformed", "token has a malformed 'sub', 'scope' or 'sid' claim")
        return TokenClaims(
            client_id=sub,
            scopes=frozenset(scope.split()),
            issuer=str(payload["iss"]),
            audience=self._audience,
            issued_at=int(payload["iat"]),
            expires_at=int(payload["exp"]),
            token_id=str(payload.get("jti", "")),
            session_id=sid,
        )
