"""Memory service: per-session, per-agent recent messages as compact context.

The servicer is in ``service``; this package exposes what the server runtime looks up by convention.
"""

from servers.memory.limits import Limits
from servers.memory.service import service_definition

__all__ = ["Limits", "service_definition"]
