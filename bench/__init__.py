"""Benchmarks: each `python -m bench.X` writes JSON under bench/results/; `python -m bench.report`
turns that JSON into docs/results.md."""
