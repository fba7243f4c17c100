"""Tokens for tests that call a service directly, minted with the mesh's own dev signing key."""

from __future__ import annotations

from heist_common.config import HeistConfig
from servers.auth import credential_store
from servers.auth.tokens import issue_token


def session_metadata(
    config: HeistConfig, session_id: str, scopes: tuple[str, ...] = ("memory:read", "memory:write")
) -> tuple[tuple[str, str], ...]:
    """Call metadata of ``session_id`` with a bearer token bound to it (what the memory service requires)."""
    token = issue_token(
        credential_store.signing_key(config),
        issuer=config.oauth.issuer,
        audience=config.oauth.audience,
        client_id="orchestrator",
        scopes=list(scopes),
        ttl_s=300,
        session_id=session_id,
    )
    return (("authorization", f"Bearer {token}"), ("x-session-id", session_id))
