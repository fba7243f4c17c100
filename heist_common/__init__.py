"""What both sides of the mesh share: the config schema, the contracts' catalogue, the run folder, exit codes.

The servers and the orchestrator each import this package and never each other,
so a client never reads a server's internals and a server never depends on the
orchestrator.
"""
