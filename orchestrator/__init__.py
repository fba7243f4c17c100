"""The client side of heist mesh: runs a crew of LLM agents over the gRPC services."""
