"""The command line of the report: regenerate docs/results.md, or render one run file.

    python -m bench.report [--results DIR] [--sweep DIR ...] [--layer-sweep DIR] [--out FILE]
    python -m bench.report --run FILE [--out FILE.md] [--no-plot]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from .document import Context, render
from .run_file import render_run


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.report",
                                description="Regenerate docs/results.md from the JSON under "
                                            "bench/results, or render one run file.")
    p.add_argument("--results", default="bench/results")
    p.add_argument("--sweep", nargs="+", default=None,
                   help="sweep run folders or summaries (default: every one under --results)")
    p.add_argument("--layer-sweep", default=None, help="a layer-sweep run folder or summary "
                   "(default: newest)")
    p.add_argument("--out", default=None, help="the document (default docs/results.md); with "
                   "--run, the run's markdown (default: printed)")
    p.add_argument("--run", default=None, metavar="FILE",
                   help="render one result file (throughput_*.json, decode_*.json, or a sweep "
                        "or layer-sweep folder) instead of the whole document")
    p.add_argument("--no-plot", action="store_true",
                   help="with --run: do not draw the run's figure beside its JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out) if args.out else None
    try:
        if args.run:
            text, console = render_run(args.run, doc_dir=out.parent if out else None,
                                       plot=not args.no_plot)
        else:
            out = out or Path("docs/results.md")
            text = render(Context(args.results, out.parent, sweep_folders=args.sweep,
                                  layer_sweep_folder=args.layer_sweep))
            console = []
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = text if text.endswith("\n") else text + "\n"
    if out is None:
        print(text, end="")
    else:
        write_atomic(out, text)
    for line in console + ([f"wrote {out} ({len(text.splitlines())} lines)"] if out else []):
        print(line)
    return 0
