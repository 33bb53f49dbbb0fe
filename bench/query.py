"""What the query buys, three experiments on one grid of seeds:

- static:  does the probe predict which layers tolerate a static query? Train MHA, probe it,
           make the k most / the k least positional layers static tables (k = 1 .. n_layers);
           loss before and after a short fine-tune.
- uptrain: does MHA -> SQA/xSQA conversion plus uptraining for 5, 10, 20 % of the base budget
           match the target trained from scratch for the base budget plus that extra? Every
           conversion method, paired by seed.
- controls: the identity and frozen random queries (and SQT) beside MHA at the base budget.

Writes bench/results/query/<run id>/ (runs/*.json per trained model, seeds/s<seed>.json per base,
summary.json), then shows the run as the report renders it.

    python -m bench.query --size medium --seeds 3 --jobs 4                   # Tiny Shakespeare
    python -m bench.query --size sqa-dense --data DATA_DIR --seeds 3 --jobs 4 # a prepared corpus
    python -m bench.query --tiny                                             # CPU smoke run
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse
import datetime
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from sqt.config import PRESETS, recipe_settings
from sqt.convert import METHODS
from sqt.utils import atomic_write_json, resolve_device, run_record

from .common import show_run
from .query_summary import controls_summary, static_summary, uptrain_summary
from .query_tasks import SUMMARY_KEYS, after_base, init_worker, train_task

EXPERIMENTS = ("static", "uptrain", "controls")
TINY = dict(size="tiny", steps=4, batch_size=2, seq_len=32, eval_batches=1, seeds=1,
            fractions=[0.5], finetune_fraction=0.5, probe_tokens=256, corpus_tokens=256,
            targets=["xsqa"], controls=["idq", "rndq"], jobs=1, threads=1, device="cpu")
"""--tiny: every experiment in seconds on the CPU, to check the pipeline, not to measure."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.query", description=__doc__.split("\n")[0])
    p.add_argument("--experiments", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS))
    p.add_argument("--size", "--preset", dest="size", default="medium", choices=list(PRESETS),
                   help="the model and its recipe (sqt.config.RECIPES)")
    p.add_argument("--data", default="tinyshakespeare",
                   help="'tinyshakespeare' or a prepared directory (sqt prepare)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="base budget (default: the recipe's)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--eval-batches", type=int, default=None)
    p.add_argument("--finetune-fraction", type=float, default=0.1,
                   help="static: fine-tune steps as a fraction of the base budget")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.2],
                   help="uptrain: fine-tune budgets as fractions of the base budget")
    p.add_argument("--targets", nargs="+", default=["sqa", "xsqa"], help="uptrain: layouts")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--controls", nargs="+", default=["idq", "rndq", "sqt"])
    p.add_argument("--probe-tokens", type=int, default=65536,
                   help="validation tokens the probe reads")
    p.add_argument("--corpus-tokens", type=int, default=262144,
                   help="training tokens the static tables average over")
    p.add_argument("--per-head", action="store_true", help="probe: Δ loss per head as well")
    p.add_argument("--eval-batch", type=int, default=16, help="windows per scoring forward")
    p.add_argument("--device", default="auto")
    p.add_argument("--jobs", type=int, default=4,
                   help="worker processes: runs prepare (compile, capture) side by side")
    p.add_argument("--device-slots", type=int, default=1,
                   help="runs whose training steps share the device at once")
    p.add_argument("--threads", type=int, default=None,
                   help="on the CPU, threads per worker (default: cores / jobs)")
    p.add_argument("--no-compile", action="store_true",
                   help="train from-scratch runs eagerly too (fine-tunes always are)")
    p.add_argument("--tiny", action="store_true", help="a CPU smoke run of every experiment")
    p.add_argument("--no-report", action="store_true",
                   help="do not show the run as the report renders it at the end")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--tag", default=None)
    p.add_argument("--into", default=None, metavar="RUN_DIR",
                   help="add to an earlier run folder of the same preset: its MHA bases and "
                        "finished runs are reused, and its summary covers everything it holds "
                        "(split work that does not fit one command)")
    return p


def plan(args, run_dir: Path) -> tuple[list, list]:
    """(from-scratch training specs, seeds whose base gets the conversions); runs the run folder
    holds already are not planned again."""
    base_steps = args.steps or recipe_settings(args.size, args.device_type)["steps"]
    seeds = list(range(args.seeds))
    specs = [{"role": "base", "label": f"base-mha-s{s}", "variant": "mha", "layers": "mha",
              "seed": s, "steps": base_steps, "model_dir": f"models/base-s{s}"} for s in seeds]
    if "uptrain" in args.experiments:
        specs += [{"role": "scratch", "label": f"scratch-{t}-f{f:g}-s{s}", "target": t,
                   "layers": t, "fraction": f, "seed": s,
                   "steps": base_steps + max(1, round(f * base_steps))}
                  for t in args.targets for f in args.fractions for s in seeds]
    if "controls" in args.experiments:
        specs += [{"role": "control", "label": f"control-{v}-s{s}", "variant": v, "layers": v,
                   "seed": s, "steps": base_steps} for v in args.controls for s in seeds]
    specs = [s for s in specs if not (run_dir / "runs" / f"{s['label']}.json").is_file()]
    return specs, seeds if {"static", "uptrain"} & set(args.experiments) else []


def execute(args, specs, seeds, common) -> list[dict]:
    """Train every spec, and each seed's conversions as soon as its base is trained (or at once,
    when the run folder holds it already). Results go to the run folder; returns the failures
    (with several jobs; one job stops at the first)."""
    failures: list[dict] = []
    pending = {s["seed"] for s in specs if s["role"] == "base"}
    threads = (args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
               if args.device_type == "cpu" else None)
    if args.jobs == 1:   # in this process, one after another
        before = torch.get_num_threads()
        init_worker(None, threads)
        try:
            for s in specs:
                train_task(s, common)
            for seed in seeds:
                after_base(seed, common)
        finally:
            torch.set_num_threads(before)
        return failures
    ctx = torch.multiprocessing.get_context("spawn")
    slots = ctx.Semaphore(args.device_slots) if args.device_type == "cuda" else None
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx, initializer=init_worker,
                             initargs=(slots, threads)) as pool:
        after = {pool.submit(after_base, seed, common): f"seed {seed}'s conversions"
                 for seed in seeds if seed not in pending}
        trained = {pool.submit(train_task, s, common): s for s in specs}
        for fut in as_completed(list(trained)):
            spec = trained[fut]
            if _failed(fut, spec["label"], failures):
                continue
            if spec["role"] == "base" and spec["seed"] in seeds:
                after[pool.submit(after_base, spec["seed"], common)] = \
                    f"seed {spec['seed']}'s conversions"
        for fut, what in after.items():
            _failed(fut, what, failures)
    return failures


def _failed(fut, what: str, failures: list) -> bool:
    """One run's failure (out of memory, a crashed worker) is recorded and the others go on: the
    work already finished stays in the run folder, and `--into` can redo only what failed."""
    try:
        fut.result()
        return False
    except Exception as e:
        failures.append({"what": what, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"})
        print(f"  FAILED {what}: {failures[-1]['error']}", flush=True)
        return True


def summarize(args, record, run_dir: Path) -> dict:
    """summary.json from everything the run folder holds (this command's work and earlier)."""
    runs = [json.loads(p.read_text()) for p in sorted((run_dir / "runs").glob("*.json"))]
    runs = [{k: r[k] for k in SUMMARY_KEYS if k in r} for r in runs]
    seeds = sorted((json.loads(p.read_text()) for p in (run_dir / "seeds").glob("*.json")),
                   key=lambda s: s["seed"])
    by_role = {role: [r for r in runs if r["role"] == role]
               for role in ("base", "scratch", "control")}
    earlier = run_dir / "summary.json"
    commands = (json.loads(earlier.read_text()).get("commands", []) if earlier.is_file()
                else []) + [record["command"]]
    summary = {"kind": "query", "run_record": record, "commands": commands, "preset": args.size,
               "data": args.data, "seeds": len(by_role["base"]), "experiments": [],
               "base_steps": by_role["base"][0]["steps"], "runs": runs,
               "hparams": recipe_settings(args.size, args.device_type)}
    if seeds and all("static" in s for s in seeds):
        summary["static"] = static_summary(seeds)
    if seeds and all(s.get("uptrain") for s in seeds):
        summary["uptrain"] = uptrain_summary(seeds, by_role["scratch"])
    if by_role["control"]:
        summary["controls"] = controls_summary(by_role["control"], by_role["base"])
    summary["experiments"] = [e for e in ("static", "uptrain", "controls") if e in summary]
    atomic_write_json(earlier, summary)
    return summary


def check(args) -> None:
    for name in ("seeds", "jobs", "device_slots", "probe_tokens", "corpus_tokens", "eval_batch",
                 "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: expected >= 1")
    for f in args.fractions + [args.finetune_fraction]:
        if not 0 < f <= 1:
            raise ValueError(f"fraction {f}: expected a fraction of the base budget in (0, 1]")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tiny:   # the smoke settings become the defaults, under what the command line gave
        parser.set_defaults(**TINY)
        args = parser.parse_args(argv)
    try:
        check(args)
        device = resolve_device(args.device, name="--device")
        args.device_type = device.type
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        run_dir = Path(args.out) / "query" / f"{stamp}-{args.size}" \
            f"{'-' + args.tag if args.tag else ''}"
        if args.into:
            run_dir = Path(args.into)
            earlier = json.loads((run_dir / "summary.json").read_text()) \
                if (run_dir / "summary.json").is_file() else {}
            if earlier.get("preset", args.size) != args.size:
                raise ValueError(f"--into {args.into!r} holds preset {earlier['preset']!r}, "
                                 f"not {args.size!r}")
        specs, seeds = plan(args, run_dir)
        from sqt.runconfig import recipe
        for spec in specs:   # every model and recipe is valid before anything trains
            recipe(args.size, layers=spec["layers"], device=str(device), steps=spec["steps"])
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    overrides = {"batch_size": args.batch_size, "seq_len": args.seq_len,
                 "eval_batches": args.eval_batches, "compile": False if args.no_compile else None}
    common = {"preset": args.size, "data": args.data, "device": str(device),
              "overrides": {k: v for k, v in overrides.items() if v is not None},
              "run_dir": str(run_dir), "experiments": args.experiments,
              "targets": args.targets, "methods": args.methods, "fractions": args.fractions,
              "finetune_fraction": args.finetune_fraction, "probe_tokens": args.probe_tokens,
              "corpus_tokens": args.corpus_tokens, "eval_batch": args.eval_batch,
              "per_head": args.per_head}
    steps = sum(s["steps"] for s in specs)
    print(f"query: {len(specs)} runs from scratch ({steps:,} steps), conversions of "
          f"{len(seeds)} base(s), on {device}, jobs={args.jobs} -> {run_dir}", flush=True)
    failures = execute(args, specs, seeds, common)
    record = {**run_record(device), "jobs": args.jobs, "device_slots": args.device_slots,
              "failures": failures,
              "total_wall_s": time.perf_counter() - PROCESS_START, "wall_from": "process start",
              "command": "python -m bench.query " + " ".join(sys.argv[1:] if argv is None
                                                               else argv)}
    if not (run_dir / "runs").is_dir() or not any((run_dir / "runs").glob("base-*.json")):
        print(f"error: no MHA base was trained; nothing to summarize in {run_dir}",
              file=sys.stderr)
        return 1
    summarize(args, record, run_dir)
    if failures:
        print(f"{len(failures)} part(s) failed (listed in the summary's run_record); rerun with "
              f"--into {run_dir} to redo them", file=sys.stderr)
        return 1
    if args.no_report:
        print(f"Wall time {record['total_wall_s']:.1f} s. Summary: {run_dir / 'summary.json'}")
    else:
        show_run(run_dir / "summary.json", record["total_wall_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
