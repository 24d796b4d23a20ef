"""Benchmarks that reproduce the paper's claims."""
