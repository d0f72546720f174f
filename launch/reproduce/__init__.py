"""Benchmark scripts: each prints a table and writes it (and its plots) to a results folder."""
