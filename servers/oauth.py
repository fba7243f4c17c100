"""OAuth service: the client-credentials grant and RFC 7662 introspection as RPCs.

Why the mesh runs its own issuer: agents need short-lived tokens limited to
one tool's scope, and tool servers verify them offline with the public key
this service publishes through GetSigningKeys.
"""

from __future__ import annotations

import hmac
from typing import Any

import grpc
from heist.oauth.v1 import oauth_pb2, oauth_pb2_grpc

from heist_common.config import HeistConfig
from servers import credentials, lifecycle
from servers.lifecycle import ServiceDefinition
from servers.tokens import ALGORITHM, InvalidTokenError, TokenVerifier, issue_token

GRANT_TYPE = "client_credentials"


class OAuthServicer(oauth_pb2_grpc.OAuthServiceServicer):
    """Serves heist.oauth.v1.OAuthService."""

    def __init__(self, config: HeistConfig) -> None:
        credentials.ensure_dev_credentials(config)
        self._settings = config.oauth
        self._secrets = credentials.client_secrets(config)
        self._signing_key = credentials.signing_key(config)
        public = self._signing_key.public_key()
        self._verifier = TokenVerifier(public, issuer=self._settings.issuer, audience=self._settings.audience)
        self._key = oauth_pb2.SigningKey(
            key_id=credentials.key_id(public), algorithm=ALGORITHM, public_key_pem=credentials.public_pem(public)
        )

    async def IssueToken(
        self, request: oauth_pb2.IssueTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oauth_pb2.IssueTokenResponse:
        """Authenticate the client and sign a token with the scopes it asked for."""
        if request.grant_type != GRANT_TYPE:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unsupported grant_type {request.grant_type!r} (only {GRANT_TYPE!r} is supported)",
            )
        if not request.client_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "client_id is required")
        expected = self._secrets.get(request.client_id)
        # Compare against a dummy for unknown clients too, so timing does not reveal which ids exist.
        matches = hmac.compare_digest(
            (expected or "\x00unknown-client").encode(), request.client_secret.encode("utf-8", "replace")
        )
        if expected is None or not matches:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid client credentials")
        allowed = self._settings.clients.get(request.client_id, ())
        requested = list(dict.fromkeys(request.scopes)) or list(allowed)
        refused = [scope for scope in requested if scope not in allowed]
        if refused:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"client {request.client_id!r} may not be granted scope(s) {', '.join(refused)} "
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
        )
        return oauth_pb2.IssueTokenResponse(access_token=token, token_type="Bearer", expires_in=ttl, scopes=requested)

    async def IntrospectToken(
        self, request: oauth_pb2.IntrospectTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oauth_pb2.IntrospectTokenResponse:
        """Report whether a token is active; an invalid token is ``active: false``, never an error."""
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
    return ServiceDefinition("oauth", OAuthServicer(config))


if __name__ == "__main__":
    raise SystemExit(lifecycle.main(__spec__))
