"""Benchmarks: each prints one JSON line per measurement, against a baseline measured in the same run."""
