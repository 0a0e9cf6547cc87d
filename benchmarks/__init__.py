"""Benchmarks for somax (run as ``python -m benchmarks.<name>``)."""
