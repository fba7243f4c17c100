"""The heist orchestrator: runs a crew of LLM agents over the gRPC mesh and audits every step."""
