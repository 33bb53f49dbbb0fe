"""The layer sweep: for one size, N = 0 .. n_layers static-query (SQT) layers first and standard
layers after; perplexity and inference latency per N, and the largest N whose perplexity stays
within a tolerance of N = 0. Training and timing are bench.sweep's.

    python -m bench.layer_sweep --size small --steps 2000
"""

from __future__ import annotations

import argparse
import sys

from sqt.config import PRESETS, SEED_SIZES, preset
from sqt.utils import atomic_write_json
from sqt.variants import hybrid_layers

from .common import show_run
from .sweep import (SIZE_HPARAMS, aggregate, check_args, common_args, execute, failed_rows,
                    hparams, ok_runs)


def largest_within(rows: list[dict], tolerance: float):
    """The largest N whose mean best-val ppl is at most (1 + tolerance) x that of N = 0. Larger N
    that pass after a failing one still count: the question is how far SQT can go, and each N is
    its own model."""
    base = next((r for r in rows if r["n_sqt"] == 0), None)
    if base is None:
        return None, None   # the baseline run failed: nothing to compare against
    base = base["best_val_ppl"]["mean"]
    ok = [r["n_sqt"] for r in rows if r["best_val_ppl"]["mean"] <= (1 + tolerance) * base]
    return max(ok), base * (1 + tolerance)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.layer_sweep",
                                description=__doc__.split("\n")[0])
    p.add_argument("--size", default="small", choices=SEED_SIZES)
    p.add_argument("--layers", nargs="+", type=int, default=None,
                   help="the N values to run (default 0 .. n_layers)")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="relative ppl tolerance against N = 0 (0.02 = 2 %%)")
    p.add_argument("--sqt", default="sqt", help="variant of the first N layers")
    p.add_argument("--rest", default="mha", help="variant of the remaining layers")
    common_args(p)
    args = p.parse_args(argv)
    n_layers = PRESETS[args.size]["n_layers"]
    ns = sorted(set(args.layers)) if args.layers else list(range(n_layers + 1))
    try:
        check_args(args)
        if not (0 <= args.tolerance < 1):
            raise ValueError(f"--tolerance={args.tolerance}: expected a fraction in [0, 1)")
        if 0 not in ns:
            raise ValueError(f"--layers={ns}: N = 0 (the baseline) must be included")
        layouts = {n: list(hybrid_layers(n_layers, n, args.sqt, args.rest)) for n in ns}
        for layers in layouts.values():
            preset(args.size, layers=tuple(layers))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    specs = [{"size": args.size, "label": f"N{n}", "layers": layouts[n], "seed": s}
             for n in ns for s in range(args.seeds)]
    try:
        run_dir, results, record = execute(specs, args, "layer_sweep")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = aggregate(results)
    for r in rows:
        r["n_sqt"] = int(r["variant"][1:])
    rows.sort(key=lambda r: r["n_sqt"])
    best_n, limit = largest_within(rows, args.tolerance)
    tc = ok_runs(results)[0]["train_config"]
    summary = {"kind": "layer_sweep", "run_record": record, "size": args.size,
               "n_layers": n_layers, "sqt": args.sqt, "rest": args.rest, "steps": tc["steps"],
               "seeds": args.seeds, "batch_size": tc["batch_size"], "seq_len": tc["seq_len"],
               "tolerance": args.tolerance, "ppl_limit": limit, "largest_n_within": best_n,
               "hparams": hparams(args.size, record["device_type"], SIZE_HPARAMS),
               "overrides": {"lr": args.lr, "dropout": args.dropout}, "rows": rows,
               "failed": failed_rows(results)}
    atomic_write_json(run_dir / "summary.json", summary)
    show_run(run_dir / "summary.json", record["total_wall_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
