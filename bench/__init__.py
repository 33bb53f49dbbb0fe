"""Benchmarks. Runners (`python -m bench.X`) measure and write JSON under bench/results/; the
report (`python -m bench.report`, the bench/report/ package) turns that JSON into docs/results.md.
Runners import sqt and bench.common, never the report; the report imports neither."""
