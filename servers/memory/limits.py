"""The memory service's bounds (``services.memory.limits``), apart so the stores and the servicer share them."""

from __future__ import annotations

from pydantic import Field

from servers.runtime import lifecycle


class Limits(lifecycle.Limits):
    """``services.memory.limits``: what one request, one session and the whole service may hold."""

    max_message_bytes: int = Field(64 * 1024, ge=1, strict=True)
    max_agent_name_chars: int = Field(128, ge=1, strict=True)
    default_recent_count: int = Field(5, ge=1, strict=True)
    default_max_chars: int = Field(100, ge=1, strict=True)
    max_recent_count: int = Field(50, ge=1, strict=True)
    """Most memories one GetCompressedMemory may ask for."""
    max_chars_per_memory: int = Field(2000, ge=1, strict=True)
    """Most characters of each memory one GetCompressedMemory may ask for."""
    max_memories_per_session: int = Field(5000, ge=1, strict=True)
    max_session_bytes: int = Field(4 * 1024 * 1024, ge=1, strict=True)
    max_sessions: int = Field(1000, ge=1, strict=True)
    max_total_bytes: int = Field(256 * 1024 * 1024, ge=1, strict=True)
    idle_session_ttl_s: float = Field(6 * 3600, gt=0, strict=True)
    """A session untouched this long is forgotten (the audit database can rebuild it)."""
