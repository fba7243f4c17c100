"""Reading the servers' access logs: one JSON object per call, among ordinary log lines."""

from __future__ import annotations

import json
from typing import Any


def access_entries(text: str) -> list[dict[str, Any]]:
    """Every access-log record in a server's log text (other log lines are skipped)."""
    entries = []
    for line in text.splitlines():
        if line.startswith('{"time"'):
            entries.append(json.loads(line))
    return entries


def calls(text: str, method: str, code: str | None = None) -> list[dict[str, Any]]:
    """Records of calls whose method path ends in ``/method`` (and that ended with ``code``)."""
    return [
        entry
        for entry in access_entries(text)
        if entry["method"].endswith(f"/{method}") and (code is None or entry["code"] == code)
    ]
