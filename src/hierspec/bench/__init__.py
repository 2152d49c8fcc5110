"""Benchmark harness support (offline prompt sets, timing helpers)."""
