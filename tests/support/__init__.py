"""Helpers the tests, drills and benchmarks share (imported as modules, never through conftest.py)."""
