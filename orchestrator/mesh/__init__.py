"""The orchestrator's side of the gRPC mesh: channels, circuit breakers, tokens, typed calls, memory sync."""
