"""Benchmark suites of nested attention (issue 6); run each with `python -m benchmarks.<suite>`."""
