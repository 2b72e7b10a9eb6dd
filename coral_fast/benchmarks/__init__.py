"""Benchmarks behind `coral-fast bench ...`; bench/ holds the pytest-benchmark suites and results."""
