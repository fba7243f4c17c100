"""The service side of heist mesh: one gRPC server process per contract."""
