"""The memory service's bounds (``services.memory.limits``), apart so the stores and the servicer share them."""

from __future__ import annotations

from pydantic import Field

from servers.runtime import lifecycle


class Limits(lifecycle.Limits):
    """``services.memory.limits``: what one request, one session and the whole service may hold."""

    max_message_bytes: int = Field(
        64 * 1024, ge=1, strict=True,
        description="Largest message one StoreMemory may store, in bytes (UTF-8).",
    )
    max_agent_name_chars: int = Field(128, ge=1, strict=True, description="Longest agent name a call may carry.")
    default_recent_count: int = Field(
        5, ge=1, strict=True,
        description="Memories GetCompressedMemory returns when the request leaves `recent_count` at 0.",
    )
    default_max_chars: int = Field(
        100, ge=1, strict=True,
        description="Characters of each memory GetCompressedMemory keeps when the request leaves `max_chars` at 0.",
    )
    max_recent_count: int = Field(50, ge=1, strict=True)
    """Most memories one GetCompressedMemory may ask for."""
    max_chars_per_memory: int = Field(2000, ge=1, strict=True)
    """Most characters of each memory one GetCompressedMemory may ask for."""
    max_memories_per_session: int = Field(
        5000, ge=1, strict=True,
        description="Memories one session may hold; more are refused with RESOURCE_EXHAUSTED.",
    )
    max_session_bytes: int = Field(
        4 * 1024 * 1024, ge=1, strict=True,
        description="Bytes of memories one session may hold.",
    )
    max_sessions: int = Field(1000, ge=1, strict=True, description="Sessions the service holds at once.")
    max_total_bytes: int = Field(
        256 * 1024 * 1024, ge=1, strict=True,
        description="Bytes of memories the service holds over every session.",
    )
    idle_session_ttl_s: float = Field(6 * 3600, gt=0, strict=True)
    """A session untouched this long is forgotten (the audit database can rebuild it)."""
