"""``orchestrator serve``: many heists in one process, as A2A tasks over gRPC (docs/service.md)."""
