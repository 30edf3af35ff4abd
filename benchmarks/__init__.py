"""Benchmarks (timings and memory; never part of the tests)."""
