"""Does packing pay on this GPU, and does CUDA MPS work here? About a minute or two: the same N
small character-level runs trained one at a time, N at once time-sliced, and N at once under MPS
(when nvidia-cuda-mps-control exists), each phase's wall time and training span (first run ready
to last run done), and the runs' step time alone against packed. Run it before the grids to
choose --device-slots and --mps; it writes bench/results/packing_check/packing_check_<time>.json.

    python -m bench.packing_check [--runs 4] [--size tiny] [--steps 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from sqt.utils import atomic_write_json, resolve_device, run_record

from . import sweep
from .common import matmul_peak_tflops
from .execution import run_grid
from .mps import mps_daemon


def phase(name: str, specs: list, common: dict, *, slots: int, mps: bool) -> dict:
    t0 = time.time()
    with mps_daemon(mps) as status:
        records = run_grid(sweep.run_one, specs, {**common, "slots": slots}, jobs=len(specs),
                           slots=slots)
    wall = time.time() - t0
    ok = [r for r in records if r["status"] == "ok"]
    ready = [r["step_time"]["ready_at"] for r in ok]
    done = [r["step_time"]["released_at"] for r in ok]
    alone = [r["ms_per_step"] for r in ok if r["ms_per_step"]]
    packed = [r["step_time"]["packed_ms_per_step"] or r["ms_per_step"] for r in ok]
    return {"phase": name, "slots": slots, "mps": status, "wall_s": wall,
            "training_span_s": (max(done) - min(ready)) if ok else None,
            "ok": len(ok), "failed": [r.get("error") for r in records if r["status"] != "ok"],
            "alone_ms_per_step": statistics.fmean(alone) if alone else None,
            "packed_ms_per_step": statistics.fmean(p for p in packed if p) if ok else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.packing_check",
                                description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=4, help="runs per phase (and slots when packed)")
    p.add_argument("--size", default="tiny", choices=("tiny", "small", "medium"))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--no-mps", action="store_true", help="skip the MPS phase")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    if args.runs < 2 or args.steps < 50:
        print("error: --runs >= 2 and --steps >= 50 expected", file=sys.stderr)
        return 2
    device = resolve_device("auto")
    if device.type != "cuda":
        print("error: bench.packing_check needs a CUDA device", file=sys.stderr)
        return 2
    peak = matmul_peak_tflops(device)      # this process's context, made before any MPS daemon
    settings = sweep.build_parser().parse_args(["--steps", str(args.steps), "--no-progress",
                                                "--jobs", str(args.runs)])
    common = {**sweep.train_settings(settings, device), "jobs": args.runs, "peak_tflops": peak,
              "threads": None}
    specs = [{"size": args.size, "label": "mha", "layers": "mha", "seed": s}
             for s in range(args.runs)]
    n = args.runs
    plan = [("one at a time", 1, False), (f"{n} at once, time-sliced", n, False)]
    if not args.no_mps:
        plan.append((f"{n} at once, MPS", n, True))
    phases = []
    for name, slots, mps in plan:
        phases.append(phase(name, specs, common, slots=slots, mps=mps))
        r = phases[-1]
        print(f"{name:26s} wall {r['wall_s']:6.1f} s, training span "
              f"{r['training_span_s'] or float('nan'):6.2f} s, ms/step alone "
              f"{r['alone_ms_per_step'] or float('nan'):.3f}, packed "
              f"{r['packed_ms_per_step'] or float('nan'):.3f}"
              + (f", MPS {'on' if r['mps']['running'] else 'off: ' + r['mps'].get('error', '')}"
                 if mps else "") + (f", failed: {r['failed']}" if r["failed"] else ""),
              flush=True)
    base = phases[0]["training_span_s"]
    for r in phases[1:]:
        if base and r["training_span_s"]:
            r["gain_over_one_at_a_time"] = base / r["training_span_s"]
            print(f"packing gain, {r['phase']}: {r['gain_over_one_at_a_time']:.2f}x "
                  "(training span, one at a time / packed)")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = Path(args.out) / "packing_check" / f"packing_check_{stamp}.json"
    atomic_write_json(path, {"run_record": run_record(device), "size": args.size,
                             "steps": args.steps, "runs": n, "phases": phases})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
