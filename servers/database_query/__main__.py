"""``python -m servers.database_query``: serve the database_query service."""

from servers.runtime import lifecycle

raise SystemExit(lifecycle.main(__spec__))
