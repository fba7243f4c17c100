"""OAuth service: the client-credentials grant and RFC 7662 introspection as RPCs.

The servicer is in ``service``; this package exposes what the server runtime looks up by convention.
"""

from servers.oauth.service import service_definition

__all__ = ["service_definition"]
