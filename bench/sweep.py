"""The size sweep: train every (size, variant, seed) on character-level Tiny Shakespeare, time the
inference of each architecture, and write per-run JSON and a summary JSON under
bench/results/sweep/<run id>/; `python -m bench.report --run` then prints the run's tables and
draws its learning curves beside it.

    python -m bench.sweep --sizes tiny small medium --steps 2000
    python -m bench.sweep --variants mha gqa mqa sqa ssqa xsqa xsmqa lsqa rsqa sqt --seeds 3

The character-level grid in one command, packed on one GPU (bench.packing_check says first
whether MPS works and what packing gains):

    python -m bench.sweep --sizes tiny small medium --variants mha gqa mqa sqa ssqa xsqa xsmqa \
        lsqa rsqa sqt --seeds 3 --jobs 12 --device-slots 6 --mps --no-latency
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()   # before torch is imported: the sweep's wall counts it

import argparse
import datetime
import math
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from sqt.accounting import param_count
from sqt.config import SEED_SIZES, preset, recipe_settings
from sqt.utils import atomic_write_json, resolve_device, run_record
from sqt.variants import VARIANTS

from .common import matmul_peak_tflops, report_run
from .execution import run_grid, train_run
from .gpus import add_gpus_argument, check_gpus, parse_gpus
from .mps import mps_daemon

# The training recipes (lr, dropout, batch, budget per size and device) are sqt.config.RECIPES, the
# same that `sqt train --size S` uses; these are the keys a sweep's summary reports.
SIZE_HPARAMS = ("lr", "dropout")
SHARED_HPARAMS = ("warmup", "weight_decay", "beta1", "beta2", "grad_clip")

_DATA_CACHE: dict = {}


def _dataset(name: str):
    if name not in _DATA_CACHE:
        from sqt.data import load_dataset
        _DATA_CACHE[name] = load_dataset(name)
    return _DATA_CACHE[name]


def hparams(size: str, device_type: str, keys: tuple) -> dict:
    """The recipe's values of `keys` for a size on a device type, as a summary reports them."""
    values = recipe_settings(size, device_type)
    return {k: values[k] for k in keys}


# The sweep's settings that override the recipe when given (None: the recipe's).
RECIPE_OVERRIDES = ("steps", "batch_size", "seq_len", "lr", "dropout", "eval_every",
                    "eval_batches", "compile", "compile_mode", "cuda_graph", "progress")


def run_configs(spec: dict, common: dict, vocab_size: int):
    """The (LMConfig, TrainConfig) of one run: sqt's recipe builder, as `sqt train` uses it."""
    from sqt.runconfig import recipe
    return recipe(spec["size"], vocab_size=vocab_size, layers=spec["layers"], seed=spec["seed"],
                  device=common["device"], **{k: common.get(k) for k in RECIPE_OVERRIDES})


def train_settings(args, device: torch.device) -> dict:
    """What the command line asks of every run: the data, the device and the recipe overrides."""
    return {"data": args.data, "device": str(device), "steps": args.steps,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
            "dropout": args.dropout, "eval_every": args.eval_every,
            "eval_batches": args.eval_batches, "compile": False if args.no_compile else None,
            "compile_mode": args.compile_mode,
            "cuda_graph": False if args.no_cuda_graph else None,
            "progress": False if (args.jobs > 1 or args.gpus or args.no_progress) else None}


def run_json(run_dir: Path, r: dict) -> Path:
    """Where one run's JSON lives; layer specs like `4/2` or `table:xsqa` made file-name safe."""
    name = f"{r['size']}-{r['variant']}-s{r['seed']}".replace("/", "_").replace(":", "-")
    return run_dir / "runs" / f"{name}.json"


def run_one(spec: dict, common: dict) -> dict:
    """Train one run (in a worker process when --jobs > 1) and return its record; the parent
    writes it. Slots, step timing alone and failures are bench.execution's."""
    if common.get("threads"):
        torch.set_num_threads(common["threads"])
    data = _dataset(common["data"])
    mcfg, tcfg = run_configs(spec, common, data.tokenizer.vocab_size)
    label = f"{spec['size']}/{spec['label']}/s{spec['seed']}"
    result = train_run(mcfg, tcfg, data, label=label, peak_tflops=common.get("peak_tflops"))
    if result["status"] != "ok":
        return result
    result.update(slot_wait_s=result["step_time"]["slot_wait_s"],
                  device_slots=common.get("slots"),
                  hparams={"lr": tcfg.lr, "dropout": mcfg.dropout,
                           **{k: getattr(tcfg, k) for k in SHARED_HPARAMS}},
                  concurrent_jobs=common["jobs"],
                  best_val_ppl=math.exp(result["best_val_loss"]),
                  final_val_ppl=math.exp(result["final_val_loss"]))
    return result


def _announce(spec: dict, r: dict) -> None:
    what = f"{spec['size']}/{spec['label']}/s{spec['seed']}"
    if r["status"] == "ok":
        print(f"  done {what}: best val {r['best_val_loss']:.4f} (ppl {r['best_val_ppl']:.3f}) "
              f"{r['ms_per_step'] or float('nan'):.2f} ms/step alone, {r['wall_s']:.1f} s",
              flush=True)
    else:
        print(f"  {r['status']} {what}: {r.get('error') or r.get('reason')}", flush=True)


def execute(specs: list[dict], args, kind: str) -> tuple[Path, list[dict], dict]:
    """Train every spec (concurrently with --jobs, --device-slots at once, under MPS with
    --mps), then time inference per architecture alone on the idle device. Returns the run
    folder, the results (a failed run's under "failed": kind, reason, step) and the shared
    record (which lists the runs the wall-time guard skipped)."""
    t0 = time.perf_counter()
    device = resolve_device(args.device, name="--device")
    _dataset(args.data)   # a missing or unreadable corpus is an error here, not in every run
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.out) / kind / (stamp + (f"-{args.tag}" if args.tag else ""))
    peak = matmul_peak_tflops(device)
    record = {**run_record(device), "matmul_peak_tflops": peak,
              "peak_dtype": "bfloat16" if device.type == "cuda" else "float32"}
    # --gpus: one worker per GPU, pinned to it; a run has its GPU alone, so no device slots.
    gpus = parse_gpus(args.gpus, available=torch.cuda.device_count()) if args.gpus else None
    jobs = len(gpus) if gpus else max(1, args.jobs)
    slots = args.device_slots if device.type == "cuda" and jobs > 1 and not gpus else None
    common = {**train_settings(args, device), "jobs": jobs, "slots": slots, "gpus": gpus,
              "peak_tflops": peak, "run_dir": str(run_dir),
              "threads": max(1, (os.cpu_count() or 1) // jobs) if device.type == "cpu" and
              jobs > 1 else None}
    print(f"{kind}: {len(specs)} runs on {record['device']} (torch {record['torch']}), "
          f"jobs={jobs}, device slots={slots}, measured matmul peak {peak:.3g} TFLOP/s -> "
          f"{run_dir}", flush=True)
    # Biggest models first, so the longest runs are not the last to start; runs of one shape
    # share inductor's on-disk compile cache.
    order = sorted(specs, key=lambda s: -SEED_SIZES.index(s["size"])
                   if s["size"] in SEED_SIZES else 0)

    def write(spec: dict, r: dict) -> None:
        r.update(size=spec["size"], variant=spec["label"], seed=spec["seed"])
        if r["status"] != "skipped":
            atomic_write_json(run_json(run_dir, r), r)
        _announce(spec, r)

    deadline = (time.time() - (time.perf_counter() - PROCESS_START) + 60 * args.max_minutes
                if args.max_minutes else None)
    with mps_daemon(args.mps and device.type == "cuda") as mps:
        done = run_grid(run_one, order, common, jobs=jobs, slots=slots, gpus=gpus,
                        deadline=deadline, on_record=write)
    by_spec = {id(o): r for o, r in zip(order, done)}
    results = [by_spec[id(s)] for s in specs if by_spec[id(s)]["status"] != "skipped"]
    if not ok_runs(results):
        raise ValueError(f"every run of this {kind} failed or was skipped: see "
                         f"{run_dir / 'runs'}")
    train_wall = time.perf_counter() - t0

    latency = {}
    if not args.no_latency:
        from .latency import measure_latency
        for r in ok_runs(results):
            key = (r["size"], r["variant"])
            if key not in latency:
                from sqt.config import LMConfig
                latency[key] = measure_latency(LMConfig.from_dict(r["model_config"]), device,
                                               compile=args.latency_compile)
        for r in ok_runs(results):
            r["latency"] = latency[(r["size"], r["variant"])]
            atomic_write_json(run_json(run_dir, r), r)
    record.update(total_wall_s=time.perf_counter() - PROCESS_START, train_wall_s=train_wall,
                  wall_from="process start", jobs=jobs, device_slots=slots, mps=mps, gpus=gpus,
                  step_times="alone",   # one at a time, or each run's own timing window
                  skipped=[{"size": o["size"], "variant": o["label"], "seed": o["seed"],
                            "reason": r["reason"]} for o, r in zip(order, done)
                           if r["status"] == "skipped"],
                  command="python -m bench." + kind + " " + " ".join(sys.argv[1:]))
    return run_dir, results, record


def mean_std(values) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def ok_runs(results: list[dict]) -> list[dict]:
    return [r for r in results if not r.get("failed")]


def failed_rows(results: list[dict]) -> list[dict]:
    """The runs that failed, as the summary lists them."""
    return [{"size": r["size"], "variant": r["variant"], "seed": r["seed"], **r["failed"]}
            for r in results if r.get("failed")]


def aggregate(results: list[dict]) -> list[dict]:
    """One row per (size, variant): mean and std over the seeds that did not fail."""
    groups: dict = {}
    for r in ok_runs(results):
        groups.setdefault((r["size"], r["variant"]), []).append(r)
    rows = []
    for (size, variant), rs in groups.items():
        lat = rs[0].get("latency") or {}
        rows.append({
            "size": size, "variant": variant, "params": rs[0]["params"], "seeds": len(rs),
            "layers": rs[0]["model_config"]["layers"], "hparams": rs[0]["hparams"],
            **{k: mean_std([r[k] for r in rs]) for k in (
                "best_val_loss", "final_val_loss", "best_val_ppl", "final_val_ppl",
                "best_val_acc", "final_val_acc", "ms_per_step", "tokens_per_s", "mfu",
                "achieved_tflops")},
            "forward_ms": lat.get("forward_ms"),
            "decode_ms_per_token": lat.get("decode_ms_per_token"),
            "latency_dtype": lat.get("dtype"), "latency_compiled": lat.get("compiled_forward"),
            "decode_engine": lat.get("decode_engine"),
            "decode_cuda_graphs": lat.get("decode_cuda_graphs"),
            "train_compiled": rs[0]["compiled"], "train_dtype": rs[0]["dtype"],
        })
    return rows


def common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default: the size's recipe, sqt.config.RECIPES)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per (size, variant): 0..N-1")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per step (default: the size's recipe; 64 on CUDA, 16 on the "
                        "CPU for the seed sizes)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per window (default: the size's recipe)")
    p.add_argument("--lr", type=float, default=None, help="override the per-size learning rate")
    p.add_argument("--dropout", type=float, default=None, help="override the per-size dropout")
    p.add_argument("--eval-every", type=int, default=None, help="default: steps / 8")
    p.add_argument("--eval-batches", type=int, default=None,
                   help="fixed validation batches per evaluation (default: the size's recipe)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-compile", action="store_true", help="train eagerly (default: compiled "
                   "on CUDA, eager on CPU)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for training")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="on CUDA, launch every step's kernels instead of replaying one captured graph")
    p.add_argument("--latency-compile", action="store_true",
                   help="compile the forward whose latency is timed")
    p.add_argument("--no-latency", action="store_true", help="skip the inference timings")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs prepared concurrently, as worker processes on the same device")
    p.add_argument("--device-slots", type=int, default=1,
                   help="with --jobs on CUDA: runs that train at once; the others compile and "
                        "capture meanwhile, then wait. With more than 1, each run's ms/step is "
                        "still taken alone, in a short window holding every slot (default 1)")
    p.add_argument("--mps", action="store_true",
                   help="start a CUDA MPS daemon for the workers (if nvidia-cuda-mps-control "
                        "exists) so packed runs overlap instead of time-slicing; stopped at exit")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-time guard from process start: start no run that cannot end in "
                        "time (estimated from the runs already trained); skipped runs are listed")
    add_gpus_argument(p)
    p.add_argument("--data", default="tinyshakespeare",
                   help="'tinyshakespeare' (bundled) or a path to a UTF-8 text file")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--tag", default=None, help="suffix of the run folder's name")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plot", action="store_true")


def check_args(args) -> None:
    from sqt.runconfig import check_compile_mode
    for name in ("steps", "seeds", "jobs", "device_slots", "batch_size", "seq_len",
                 "eval_batches"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: expected >= 1")
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise ValueError(f"--max-minutes={args.max_minutes}: expected a number of minutes > 0")
    check_compile_mode(args.compile_mode)
    resolve_device(args.device, name="--device")
    check_gpus(args.gpus, args.device)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=list(SEED_SIZES), choices=SEED_SIZES)
    p.add_argument("--summarize", type=Path, default=None, metavar="RUN_DIR",
                   help="only rebuild RUN_DIR/summary.json from its runs/*.json (no training)")
    p.add_argument("--variants", nargs="+", default=["mha", "sqt"],
                   help=f"variant names ({', '.join(VARIANTS)}) or layer specs; the first "
                   "(or mha when listed) is the baseline")
    common_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.summarize is not None:
        return resummarize(args.summarize, plot=not args.no_plot)
    try:
        check_args(args)
        for size in args.sizes:  # validate every variant at every size before training anything
            for v in args.variants:
                param_count(preset(size, layers=v))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    baseline = "mha" if "mha" in args.variants else args.variants[0]
    specs = [{"size": s, "label": v, "layers": v, "seed": seed} for s in args.sizes
             for v in args.variants for seed in range(args.seeds)]
    try:
        run_dir, results, record = execute(specs, args, "sweep")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tc = ok_runs(results)[0]["train_config"]
    meta = {"baseline": baseline, "sizes": args.sizes, "variants": args.variants,
            "seeds": args.seeds, "steps": tc["steps"], "batch_size": tc["batch_size"],
            "seq_len": tc["seq_len"], "overrides": {"lr": args.lr, "dropout": args.dropout}}
    summarize(run_dir, results, record, meta, plot=not args.no_plot)
    return 0


def summarize(run_dir: Path, results: list[dict], record: dict, meta: dict,
              plot: bool = True) -> dict:
    """Write summary.json from the runs' results, then show it as the report renders it."""
    rows = aggregate(results)
    summary = {"kind": "sweep", "run_record": record, **meta,
               "hparams": {s: hparams(s, record["device_type"], SIZE_HPARAMS)
                           for s in meta["sizes"]},
               "shared": hparams(meta["sizes"][0], record["device_type"], SHARED_HPARAMS),
               "rows": rows, "failed": failed_rows(results),
               "runs": sorted(str(p.relative_to(run_dir))
                              for p in (run_dir / "runs").glob("*.json"))}
    atomic_write_json(run_dir / "summary.json", summary)
    print()
    report_run(run_dir / "summary.json", *([] if plot else ["--no-plot"]))
    print(f"\nSummary: {run_dir / 'summary.json'}")
    return summary


def resummarize(run_dir: Path, plot: bool = True) -> int:
    """Rebuild a folder's summary.json from its runs/*.json, for a sweep whose process ended
    after its runs were written (e.g. stopped during the latency phase). Nothing is re-run; the
    summary says it was rebuilt, and latency is absent unless the runs hold it."""
    results = [json.loads(p.read_text()) for p in sorted((run_dir / "runs").glob("*.json"))]
    order = {size: i for i, size in enumerate(SEED_SIZES)}
    results.sort(key=lambda r: (order.get(r["size"], len(order)), r["variant"] != "mha",
                                r["variant"], r["seed"]))
    if not results:
        print(f"error: no runs/*.json under {str(run_dir)!r}", file=sys.stderr)
        return 2
    first = next(iter(ok_runs(results)), None)
    if first is None:
        print(f"error: every run under {str(run_dir)!r} failed; nothing to summarize",
              file=sys.stderr)
        return 2
    record = {**first["run_record"], "matmul_peak_tflops": first.get("peak_tflops"),
              "peak_dtype": "bfloat16" if first["run_record"]["device_type"] == "cuda"
              else "float32",
              "jobs": first.get("concurrent_jobs"), "device_slots": first.get("device_slots"),
              "rebuilt_from_runs": True,
              "command": "python -m bench.sweep --summarize " + str(run_dir)}
    tc = first["train_config"]
    variants = list(dict.fromkeys(r["variant"] for r in results))
    meta = {"baseline": "mha" if "mha" in variants else variants[0],
            "sizes": list(dict.fromkeys(r["size"] for r in results)), "variants": variants,
            "seeds": len({r["seed"] for r in results}), "steps": tc["steps"],
            "batch_size": tc["batch_size"], "seq_len": tc["seq_len"], "overrides": None}
    summarize(run_dir, results, record, meta, plot=plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
