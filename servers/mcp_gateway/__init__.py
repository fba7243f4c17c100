"""The MCP gateway: every tool service of the mesh as MCP tools over Streamable HTTP (docs/mcp.md).

``python -m servers.mcp_gateway`` runs it (``make serve`` does, when the config has an ``mcp_gateway``
section). ``catalogue`` derives the tools from the contracts, ``upstream`` calls the tool services,
``bounds`` limits what one client may ask, ``service`` is the HTTP server, auth and audit.
"""
