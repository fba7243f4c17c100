"""Database query service: one read-only SELECT per call against the bank database.

The servicer is in ``service``; this package exposes what the server runtime looks up by convention.
"""

from servers.database_query.service import Limits, service_definition

__all__ = ["Limits", "service_definition"]
