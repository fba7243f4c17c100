"""``python -m servers.oauth``: serve the oauth service."""

from servers.runtime import lifecycle

raise SystemExit(lifecycle.main(__spec__))
