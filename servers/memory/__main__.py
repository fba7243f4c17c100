"""``python -m servers.memory``: serve the memory service."""

from servers.runtime import lifecycle

raise SystemExit(lifecycle.main(__spec__))
