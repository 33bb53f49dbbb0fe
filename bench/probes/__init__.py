"""One-off probes: the scripts that produced committed results outside the benchmarks. Each folder
is named after the run it produced (its JSON, output and README stay under bench/results/), and
each script runs from the repository root:

    PYTHONPATH=src:. OUT=<folder> python bench/probes/<run id>/<script>.py

They may import sqt's public names and bench's runner modules; nothing imports them."""
