"""Benchmarks and evaluation: data loading, metrics, and the continual-learning harness."""
