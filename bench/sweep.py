"""The size sweep: train every (size, variant, seed) on character-level Tiny Shakespeare, time the
inference of each architecture, and write per-run JSON, a summary JSON, the seed-style table, the
variant-quality table and a learning-curve plot under bench/results/sweep/<run id>/.

    python -m bench.sweep --sizes tiny small medium --steps 2000
    python -m bench.sweep --variants mha gqa mqa sqa ssqa xsqa xsmqa lsqa rsqa sqt --seeds 3
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
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from sqt.config import SEED_SIZES, VARIANTS, param_count, preset, recipe_settings
from sqt.utils import atomic_write_json, resolve_device, run_record

from .common import matmul_peak_tflops

# The training recipes (lr, dropout, batch, budget per size and device) are sqt.config.RECIPES, the
# same that `sqt train --size S` uses; these are the keys a sweep's summary reports.
SIZE_HPARAMS = ("lr", "dropout")
SHARED_HPARAMS = ("warmup", "weight_decay", "beta1", "beta2", "grad_clip")

_DATA_CACHE: dict = {}
_DEVICE_SLOTS = None   # in a worker: a semaphore shared by every run of the sweep, or None


def _init_worker(slots) -> None:
    global _DEVICE_SLOTS
    _DEVICE_SLOTS = slots


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
            "progress": False if (args.jobs > 1 or args.no_progress) else None}


def run_json(run_dir: Path, r: dict) -> Path:
    """Where one run's JSON lives; layer specs like `4/2` or `table:xsqa` made file-name safe."""
    name = f"{r['size']}-{r['variant']}-s{r['seed']}".replace("/", "_").replace(":", "-")
    return run_dir / "runs" / f"{name}.json"


def run_one(spec: dict, common: dict) -> dict:
    """Train one run and write its JSON. Runs in a worker process when --jobs > 1."""
    from sqt.train import train
    if common.get("threads"):
        torch.set_num_threads(common["threads"])
    data = _dataset(common["data"])
    mcfg, tcfg = run_configs(spec, common, data.tokenizer.vocab_size)
    # With device slots, a run compiles and captures its step alongside the others, then waits
    # for a slot before training: processes on one GPU are time-sliced, not run side by side, so
    # training several at once is slower in total than one after another, and its step times
    # would be shared-device figures.
    held = {"wait_s": 0.0, "slot": False}

    def take_slot():
        t = time.perf_counter()
        _DEVICE_SLOTS.acquire()
        held.update(wait_s=time.perf_counter() - t, slot=True)

    try:
        result = train(mcfg, tcfg, data, peak_tflops=common.get("peak_tflops"),
                       label=f"{spec['size']}/{spec['label']}/s{spec['seed']}",
                       on_ready=take_slot if _DEVICE_SLOTS is not None else None)
    finally:
        if held["slot"]:
            _DEVICE_SLOTS.release()
    result.pop("model")
    result.update(slot_wait_s=held["wait_s"], device_slots=common.get("slots"))
    result.update(size=spec["size"], variant=spec["label"], seed=spec["seed"],
                  hparams={"lr": tcfg.lr, "dropout": mcfg.dropout,
                           **{k: getattr(tcfg, k) for k in SHARED_HPARAMS}},
                  concurrent_jobs=common["jobs"],
                  best_val_ppl=math.exp(result["best_val_loss"]),
                  final_val_ppl=math.exp(result["final_val_loss"]))
    atomic_write_json(run_json(Path(common["run_dir"]), result), result)
    print(f"  done {result['label']}: best val {result['best_val_loss']:.4f} "
          f"(ppl {result['best_val_ppl']:.3f}) {result['ms_per_step'] or float('nan'):.1f} ms/step "
          f"{result['wall_s']:.1f} s", flush=True)
    return result


def execute(specs: list[dict], args, kind: str) -> tuple[Path, list[dict], dict]:
    """Train every spec (concurrently with --jobs), then time inference per architecture alone on
    the idle device. Returns the run folder, the results and the shared record."""
    t0 = time.perf_counter()
    device = resolve_device(args.device, name="--device")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.out) / kind / (stamp + (f"-{args.tag}" if args.tag else ""))
    peak = matmul_peak_tflops(device)
    record = {**run_record(device), "matmul_peak_tflops": peak,
              "peak_dtype": "bfloat16" if device.type == "cuda" else "float32"}
    jobs = max(1, args.jobs)
    common = {**train_settings(args, device), "jobs": jobs,
              "slots": (args.device_slots if device.type == "cuda" and jobs > 1
                        and args.device_slots < jobs else None),
              "peak_tflops": peak, "run_dir": str(run_dir),
              "threads": max(1, (os.cpu_count() or 1) // jobs) if device.type == "cpu" and
              jobs > 1 else None}
    print(f"{kind}: {len(specs)} runs on {record['device']} (torch {record['torch']}), "
          f"jobs={jobs}, measured matmul peak {peak:.3g} TFLOP/s -> {run_dir}", flush=True)
    if jobs == 1:
        results = [run_one(s, common) for s in specs]
    else:
        # Biggest models first, so the longest runs are not the last to start. Workers are spawned
        # (CUDA cannot fork); runs of one shape share inductor's on-disk compile cache.
        order = sorted(specs, key=lambda s: -SEED_SIZES.index(s["size"])
                       if s["size"] in SEED_SIZES else 0)
        ctx = torch.multiprocessing.get_context("spawn")
        slots = ctx.Semaphore(common["slots"]) if common["slots"] else None
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                                 initargs=(slots,)) as pool:
            futures = [(s, pool.submit(run_one, s, common)) for s in order]
            done = {id(s): f.result() for s, f in futures}
        results = [done[id(s)] for s in specs]
    train_wall = time.perf_counter() - t0

    latency = {}
    if not args.no_latency:
        from .latency import measure_latency
        for r in results:
            key = (r["size"], r["variant"])
            if key not in latency:
                from sqt.config import LMConfig
                latency[key] = measure_latency(LMConfig.from_dict(r["model_config"]), device,
                                               compile=args.latency_compile)
        for r in results:
            r["latency"] = latency[(r["size"], r["variant"])]
            atomic_write_json(run_json(run_dir, r), r)
    record.update(total_wall_s=time.perf_counter() - PROCESS_START, train_wall_s=train_wall,
                  wall_from="process start", jobs=jobs, device_slots=common["slots"],
                  command="python -m bench." + kind + " " + " ".join(sys.argv[1:]))
    return run_dir, results, record


def mean_std(values) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def aggregate(results: list[dict]) -> list[dict]:
    """One row per (size, variant): mean and std over seeds."""
    groups: dict = {}
    for r in results:
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


def fmt(ms: dict, digits: int = 2, scale: float = 1.0) -> str:
    if ms is None or ms.get("mean") is None:
        return "-"
    s = f"{ms['mean'] * scale:.{digits}f}"
    return s + (f" ± {ms['std'] * scale:.{digits}f}" if ms["n"] > 1 else "")


def pct(new, old) -> str:
    return "-" if new is None or old is None else f"{100 * (new / old - 1):+.1f} %"


def params_str(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.0f} k"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def seed_table(rows: list[dict], baseline: str) -> str:
    """The seed README's table: each variant against the baseline of its size."""
    by = {(r["size"], r["variant"]): r for r in rows}
    out = []
    for r in rows:
        base = by.get((r["size"], baseline))
        if base is None or r["variant"] == baseline:
            continue
        bb, vb = base["best_val_ppl"]["mean"], r["best_val_ppl"]["mean"]
        bf, vf = base["final_val_ppl"]["mean"], r["final_val_ppl"]["mean"]
        out.append([r["size"], r["variant"], f"{params_str(base['params'])} / "
                    f"{params_str(r['params'])}", fmt(base["best_val_ppl"], 3),
                    fmt(r["best_val_ppl"], 3), pct(vb, bb), fmt(base["final_val_ppl"], 3),
                    fmt(r["final_val_ppl"], 3), pct(vf, bf),
                    pct(r["forward_ms"], base["forward_ms"]),
                    pct(r["decode_ms_per_token"], base["decode_ms_per_token"])])
    return table(["size", "variant", "params (base / variant)", f"{baseline} ppl (best)",
                  "variant ppl (best)", "Δ ppl", f"{baseline} ppl (final)", "variant ppl (final)",
                  "Δ ppl (final)", "forward latency", "decode latency"], out)


def quality_table(rows: list[dict]) -> str:
    out = [[r["size"], r["variant"], params_str(r["params"]), fmt(r["best_val_loss"], 4),
            fmt(r["best_val_ppl"], 3), fmt(r["best_val_acc"], 2, 100), fmt(r["ms_per_step"], 2),
            str(r["seeds"])] for r in rows]
    return table(["size", "variant", "params", "best val loss (nats)", "best val ppl",
                  "val accuracy (%)", "ms / train step", "seeds"], out)


def speed_table(rows: list[dict]) -> str:
    out = [[r["size"], r["variant"], fmt(r["ms_per_step"], 2), fmt(r["tokens_per_s"], 0),
            fmt(r["mfu"], 1, 100), fmt(r["achieved_tflops"], 2),
            "-" if r["forward_ms"] is None else f"{r['forward_ms']:.3f}",
            "-" if r["decode_ms_per_token"] is None else f"{r['decode_ms_per_token']:.3f}"]
           for r in rows]
    return table(["size", "variant", "ms / train step", "tokens / s", "MFU (%)", "TFLOP/s",
                  "forward ms (1×256)", "decode ms / token"], out)


def speed_note(rows: list[dict], record: dict) -> str:
    r = rows[0] if rows else {}
    precision = ("bfloat16 autocast" if r.get("train_dtype") == "bfloat16"
                 else f"{r.get('train_dtype')}, no autocast")
    slots = record.get("device_slots")
    if record["jobs"] > 1 and slots == 1:
        sharing = (f"{record['jobs']} worker processes compiling side by side, one training at a "
                   "time (step times isolated)")
    elif record["jobs"] > 1:
        sharing = (f"{record['jobs']} concurrent job(s) on one device (step times are "
                   "shared-device throughput, not isolated; use --device-slots 1 for isolated "
                   "step times)")
    else:
        sharing = "one run at a time (step times isolated)"
    note = (f"Training: {precision}, compiled={r.get('train_compiled')}, {sharing}"
            + f". MFU against the measured {record['peak_dtype']} matmul peak of "
            f"{record['matmul_peak_tflops']:.3g} TFLOP/s. ")
    if r.get("forward_ms") is None:
        return note + "Inference latency not measured (--no-latency)."
    decode = ("decode eager with the KV cache" if not r.get("decode_engine") else
              f"decode on {r['decode_engine']} (CUDA graphs: {r.get('decode_cuda_graphs')})")
    return note + (f"Inference: batch 1, weights in {r.get('latency_dtype')}, forward "
                   f"compiled={r.get('latency_compiled')}, {decode}; medians after warm-up.")


def plot_curves(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; skipping the learning-curve plot "
              "(pip install 'sqt[plot]')")
        return False
    sizes = list(dict.fromkeys(r["size"] for r in results))
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for i, variant in enumerate(dict.fromkeys(r["variant"] for r in results
                                                  if r["size"] == size)):
            rs = [r for r in results if r["size"] == size and r["variant"] == variant]
            steps = [c["step"] for c in rs[0]["curves"]]
            for key, style in (("val_loss", "-"), ("train_loss", ":")):
                ys = [statistics.fmean(r["curves"][j][key] for r in rs) for j in range(len(steps))]
                ax.plot(steps, ys, style, color=f"C{i}",
                        label=f"{variant} {'val' if key == 'val_loss' else 'train'}")
        ax.set_title(size)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / char)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


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
                        "capture meanwhile, then wait (1 keeps step times isolated; more "
                        "time-slices the GPU between processes)"),
    p.add_argument("--data", default="tinyshakespeare",
                   help="'tinyshakespeare' (bundled) or a path to a UTF-8 text file")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--tag", default=None, help="suffix of the run folder's name")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plot", action="store_true")


def check_args(args) -> None:
    for name in ("steps", "seeds", "jobs", "device_slots", "batch_size", "seq_len",
                 "eval_batches"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: expected >= 1")


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
    tc = results[0]["train_config"]
    meta = {"baseline": baseline, "sizes": args.sizes, "variants": args.variants,
            "seeds": args.seeds, "steps": tc["steps"], "batch_size": tc["batch_size"],
            "seq_len": tc["seq_len"], "overrides": {"lr": args.lr, "dropout": args.dropout}}
    summarize(run_dir, results, record, meta, plot=not args.no_plot)
    return 0


def summarize(run_dir: Path, results: list[dict], record: dict, meta: dict,
              plot: bool = True) -> dict:
    """Write summary.json from the runs' results and print the tables."""
    rows = aggregate(results)
    plotted = plot and plot_curves(results, run_dir / "curves.png")
    summary = {"kind": "sweep", "run_record": record, **meta,
               "hparams": {s: hparams(s, record["device_type"], SIZE_HPARAMS)
                           for s in meta["sizes"]},
               "shared": hparams(meta["sizes"][0], record["device_type"], SHARED_HPARAMS),
               "rows": rows, "runs": sorted(str(p.relative_to(run_dir)) for p in
                                            (run_dir / "runs").glob("*.json")),
               "plot": "curves.png" if plotted else None}
    atomic_write_json(run_dir / "summary.json", summary)
    print(f"\nSize sweep ({meta['steps']} steps, batch {meta['batch_size']} x {meta['seq_len']}, "
          f"{meta['seeds']} seed(s); mean ± std over seeds)\n")
    print(seed_table(rows, meta["baseline"]))
    print("\nVariant quality\n")
    print(quality_table(rows))
    print("\nSpeed\n")
    print(speed_table(rows))
    print("\n" + speed_note(rows, record))
    if record.get("total_wall_s") is not None:
        print(f"\nSweep wall time {record['total_wall_s']:.1f} s from process start (training "
              f"{record['train_wall_s']:.1f} s, incl. compilation and evaluation).")
    print(f"Summary: {run_dir / 'summary.json'}")
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
    first = results[0]
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
