"""Benchmarks of a tier of replicas under failure."""
