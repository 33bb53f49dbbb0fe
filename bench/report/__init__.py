"""The report: reads the JSON the runners wrote under bench/results and writes docs/results.md and
its figures. It imports neither torch, nor sqt, nor any runner: data flows runner -> JSON ->
report, so rendering can never change a measurement, and runs without a GPU stack.

    python -m bench.report                          # docs/results.md (+ docs/throughput.png)
    python -m bench.report --run FILE [--out MD]    # one run file (what a runner shows after it)

Where things live:
    document.py   SECTIONS, the one ordered list of what docs/results.md holds; render()
    sections/     one module per section, each with `section(ctx) -> str | None`
    run_file.py   one result file -> its section and figure (runners call it in a subprocess)
    cli.py        the command line
    markdown.py   tables, number formats, variant labels
    criteria.py   a criterion: target, measured, verdict
    claims.py     what the source documents claim, and the targets set against them
    notes.py      run notes (bench/results/notes.json)
    sources.py    finding and loading result files (newest of a kind, sweep summaries)
    plots.py      the matplotlib guard and every figure

Adding a section: write sections/<name>.py with `section(ctx)` that reads its JSON under
ctx.results (find it with sources.py) and returns markdown, or None when there is none; format
with markdown.py, judge with criteria.py, quote claims and targets from claims.py, draw into
ctx.figure_dir with a function in plots.py. Then add `<name>.section` to SECTIONS in
document.py where it should appear. Import nothing outside this package but the standard
library and matplotlib (tests/test_report.py checks that torch and sqt stay out).
"""

from .cli import main

__all__ = ["main"]   # `from bench import report; report.main([...])`
