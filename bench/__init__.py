"""Benchmarks: `python -m bench` (make bench) and the modules bench_*.py, each runnable on its own."""
