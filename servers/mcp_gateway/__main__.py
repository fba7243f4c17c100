"""``python -m servers.mcp_gateway``."""

from servers.mcp_gateway.service import main

raise SystemExit(main())
