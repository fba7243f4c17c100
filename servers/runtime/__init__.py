"""The one server bootstrap every service runs on: lifecycle, per-call middleware, metrics, request guard."""
