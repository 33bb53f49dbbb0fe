"""Training on several GPUs: how `sqt train` under torchrun scales with the number of processes.

`python -m bench.scaling dense --data DATA_DIR --gpus 1,2,4 [--layers mha xsqa] [--steps N |
--tokens N] [--seeds 0 1 2]`: the `sqa-dense` preset, DDP, one run per (layout, world size,
seed), each with the SAME global batch and token budget (the trainer splits every batch across
the ranks). Per (layout, W): tokens/s, ms/step, the validation loss, the scaling efficiency
tokens_per_s(W) / (W x tokens_per_s(1)) (target >= 0.90 at 4 GPUs: printed, never asserted) and
the validation loss's difference from W=1 (against the spread over seeds where there are
several).

`python -m bench.scaling fsdp --gpus 1,2,4 [--seq-len 32768]`: the throughput benchmark's
`wide128` model (sqa-dense at d_model 2048, head dim 128) under FSDP2 at 32k tokens a sequence
on the bundled Tiny Shakespeare, a few steps, one sequence per GPU (the global batch grows with
W): step time and peak memory per GPU at each W.

`--dry-run` prints the torchrun commands and exits. `--device cpu` runs the processes on the CPU
(gloo), for a check of the pipeline on a machine without GPUs. Every process gets
NCCL_NVLS_ENABLE=0 (NVLink multicast off). Writes bench/results/scaling/<UTC time>-<mode>.json
and keeps each run's folder (its checkpoint removed unless --keep-checkpoints) beside it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from bench.scaling_math import dense_rows, fsdp_rows

RESULTS = Path(__file__).resolve().parent / "results" / "scaling"
ROOT = Path(__file__).resolve().parent.parent
EFFICIENCY_TARGET = 0.90          # at 4 GPUs; printed, never asserted
WIDE = "wide128"                  # bench.throughput_cases.MODELS: d_model 2048, head dim 128


class Refused(Exception):
    """A setting this runner cannot run: one line, exit status 2."""


def parse_gpus(text: str, *, check_devices: bool) -> list[int]:
    """`1,2,4` -> [1, 2, 4]: distinct positive world sizes, each within the CUDA devices there
    are when `check_devices`."""
    sizes = []
    for part in text.split(","):
        if not part.strip().isdigit() or int(part) < 1:
            raise Refused(f"--gpus {text}: {part.strip()!r} is not a positive whole number of "
                          "processes (expected e.g. 1,2,4)")
        if int(part) in sizes:
            raise Refused(f"--gpus {text}: {int(part)} appears twice")
        sizes.append(int(part))
    if check_devices:
        import torch
        have = torch.cuda.device_count()
        for w in sizes:
            if w > have:
                raise Refused(f"--gpus {text}: world size {w} needs {w} GPUs; this machine has "
                              f"{have} (torch.cuda.device_count()); --device cpu runs the "
                              "processes on the CPU")
    return sizes


def child_env() -> dict:
    """The processes' environment: this one, NVLink multicast off, and the `sqt` and `bench`
    packages importable (PYTHONPATH passed through after them)."""
    path = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "NCCL_NVLS_ENABLE": "0",
            "PYTHONPATH": os.pathsep.join(p for p in path if p)}


def resolved_batch(args) -> tuple[int, int]:
    """(global batch, grad_accum) of the runs: the flags, else the preset's recipe on the
    device the runs use."""
    from sqt.runconfig import recipe_settings
    device_type = "cpu" if args.device == "cpu" else "cuda"
    settings = recipe_settings(args.preset, device_type)
    return (args.batch_size or settings.get("batch_size", 64),
            args.grad_accum or settings.get("grad_accum", 1))


def plan(args) -> list[dict]:
    """Every run: its name, world size, layout, seed, folder and torchrun command."""
    folder = args.folder
    runs = []
    if args.mode == "dense":
        batch, accum = resolved_batch(args)
        for w in args.gpus:
            if batch % (w * accum):
                raise Refused(f"--batch-size {batch}: expected a multiple of world size x "
                              f"grad_accum = {w} x {accum} for --gpus "
                              f"{','.join(map(str, args.gpus))}; choose a batch every world "
                              "size divides")
        budget = (["--steps", str(args.steps)] if args.steps else
                  ["--tokens", str(args.tokens)] if args.tokens else [])
        for layout in args.layers:
            for w in args.gpus:
                for seed in args.seeds:
                    name = f"{layout}-w{w}" + (f"-s{seed}" if len(args.seeds) > 1 else "")
                    train = ["--preset", args.preset, "--data", args.data, "--layers", layout,
                             "--batch-size", str(batch), "--grad-accum", str(accum), *budget,
                             "--seed", str(seed)]
                    runs.append(dict(name=name, world_size=w, layout=layout, seed=seed,
                                     train=train))
    else:
        from bench.throughput_cases import MODELS
        wide = MODELS[WIDE]
        for w in args.gpus:
            train = ["--preset", wide["preset"], "--data", args.data or "tinyshakespeare",
                     "--layers", args.layers[0], "--d-model", str(wide["d_model"]),
                     "--d-ff", str(wide["d_ff"]), "--seq-len", str(args.seq_len),
                     "--batch-size", str(w * args.per_gpu_batch), "--grad-accum", "1",
                     "--steps", str(args.steps or 8), "--eval-batches", "1", "--dropout", "0.0",
                     "--fsdp"]
            runs.append(dict(name=f"{args.layers[0]}-w{w}", world_size=w, layout=args.layers[0],
                             seed=0, train=train))
    for run in runs:
        run["out_dir"] = str(folder / "runs" / run["name"])
        extra = (["--device", args.device] if args.device else []) + shlex.split(args.train_args)
        # torchrun as a module of this interpreter: the same environment, whatever PATH holds.
        run["command"] = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", str(run["world_size"]),
                          "-m", "sqt", "train", *run["train"], *extra, "--no-progress",
                          "--out-dir", run["out_dir"], "--overwrite"]
    return runs


def launch(run: dict, env: dict, timeout: float, keep: bool) -> dict:
    """Run one torchrun job; its record: result.json's figures, or how it failed."""
    out = Path(run["out_dir"])
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{run['name']}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            code = subprocess.run(run["command"], env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    record = {k: run[k] for k in ("name", "world_size", "layout", "seed", "command")}
    record.update(wall_s=round(time.perf_counter() - t0, 1), log=log.name)
    result_path = out / "result.json"
    if code != 0 or not result_path.is_file():
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        record.update(status="failed", returncode=code, error=tail[-1][:300] if tail else "")
        return record
    import json
    result = json.loads(result_path.read_text())
    record.update(status="ok", result={k: result.get(k) for k in RESULT_FIELDS})
    if not keep:
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    return record


RESULT_FIELDS = ("world_size", "parallel", "process_group_backend", "device", "dtype", "compiled",
                 "cuda_graph", "params", "ms_per_step", "tokens_per_s", "mfu", "best_val_loss",
                 "best_step", "final_val_loss", "final_train_loss", "peak_memory_bytes", "wall_s",
                 "budget", "train_config")


def summarise(args, records: list[dict]) -> dict:
    from sqt.utils import run_record
    rows = (dense_rows(records) if args.mode == "dense" else fsdp_rows(records))
    return {"kind": f"scaling_{args.mode}", "run_record": run_record(
                "cpu" if args.device == "cpu" else None),
            "command": "python -m bench.scaling " + " ".join(map(shlex.quote, args.argv)),
            "mode": args.mode, "gpus": args.gpus, "layers": args.layers, "seeds": args.seeds,
            "efficiency_target": EFFICIENCY_TARGET, "env": {"NCCL_NVLS_ENABLE": "0"},
            "folder": args.folder.name, "method": METHOD[args.mode], "rows": rows,
            "runs": records}


METHOD = {
    "dense": "DDP, one torchrun job per (layout, world size, seed); every job trains the same "
             "global batch (split across its ranks) for the same token budget from the same seed, "
             "so a world size changes only how the work is spread. ms/step and tokens/s are the "
             "trainer's steady-state figures (result.json). Efficiency = tokens_per_s(W) / (W x "
             "tokens_per_s(1)), from the mean over seeds. The val loss difference is the mean "
             "at W minus the mean at W=1; with several seeds, seed_spread is the std at W=1.",
    "fsdp": "FSDP2, one torchrun job per world size, one sequence per GPU (the global batch "
            "is W sequences), a few steps on the bundled Tiny Shakespeare. ms/step is the "
            "trainer's steady-state figure; peak memory is torch.cuda.max_memory_allocated, the "
            "largest over the ranks, as the trainer records it (peak_memory_bytes).",
}


def print_rows(summary: dict) -> None:
    for r in summary["rows"]:
        if r.get("status") != "ok":
            print(f"{r['layout']} W={r['world_size']}: {r.get('status')} {r.get('error', '')}")
            continue
        gib = r.get("peak_memory_gib")
        eff = r.get("efficiency")
        print(f"{r['layout']} W={r['world_size']}: {r['tokens_per_s']:.0f} tokens/s, "
              f"{r['ms_per_step']:.1f} ms/step"
              + (f", efficiency {eff:.3f}" if eff is not None else "")
              + (f", val loss {r['val_loss']:.4f} (vs W=1 {r['val_loss_diff']:+.4f})"
                 if r.get("val_loss_diff") is not None else "")
              + (f", peak {gib:.2f} GiB/GPU" if gib is not None else ""))
    top = [r for r in summary["rows"] if r.get("world_size") == 4 and r.get("efficiency")]
    for r in top:
        verdict = "meets" if r["efficiency"] >= EFFICIENCY_TARGET else "misses"
        print(f"{r['layout']}: efficiency at 4 GPUs {r['efficiency']:.3f} {verdict} the target "
              f">= {EFFICIENCY_TARGET}")


def parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("dense", "fsdp"))
    ap.add_argument("--gpus", default="1,2,4", help="world sizes, e.g. 1,2,4 (default: %(default)s)")
    ap.add_argument("--data", default=None,
                    help="dataset for `sqt train --data` (dense: required; fsdp: tinyshakespeare)")
    ap.add_argument("--preset", default="sqa-dense", help="dense mode's preset (default: %(default)s)")
    ap.add_argument("--layers", nargs="+", default=None,
                    help="layouts, one run each (default: dense mha xsqa; fsdp mha)")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help="steps of every run")
    budget.add_argument("--tokens", type=int, default=None, help="token budget of every run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="dense: the global batch (default: the preset's)")
    ap.add_argument("--grad-accum", type=int, default=None, help="dense: micro-batches a step")
    ap.add_argument("--seq-len", type=int, default=32768, help="fsdp: tokens a sequence")
    ap.add_argument("--per-gpu-batch", type=int, default=1, help="fsdp: sequences per GPU")
    ap.add_argument("--device", choices=("cpu",), default=None,
                    help="cpu: run the processes on the CPU (gloo), a pipeline check")
    ap.add_argument("--train-args", default="", help="more `sqt train` flags, one string")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds a run may take")
    ap.add_argument("--keep-checkpoints", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = ap.parse_args(argv)
    args.argv = list(argv)
    if args.mode == "dense" and not args.data:
        raise Refused("dense: --data is required (a directory written by `sqt prepare`, or "
                      "tinyshakespeare)")
    args.layers = args.layers or (["mha", "xsqa"] if args.mode == "dense" else ["mha"])
    args.gpus = parse_gpus(args.gpus, check_devices=args.device != "cpu" and not args.dry_run)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    args.stamp = stamp
    args.folder = args.out / f"{stamp}-{args.mode}"
    return args


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(argv)
        runs = plan(args)
    except Refused as e:
        print(f"bench.scaling: error: {e}", file=sys.stderr)
        return 2
    env = child_env()
    if args.dry_run:
        print("# environment: NCCL_NVLS_ENABLE=0 PYTHONPATH=" + shlex.quote(env["PYTHONPATH"]))
        for run in runs:
            print(shlex.join(run["command"]))
        return 0
    records = []
    for run in runs:
        print(f"{run['name']}: {shlex.join(run['command'])}", flush=True)
        records.append(launch(run, env, args.timeout, args.keep_checkpoints))
        print(f"  {records[-1]['status']} in {records[-1]['wall_s']} s", flush=True)
    summary = summarise(args, records)
    path = args.out / f"{args.stamp}-{args.mode}.json"
    from sqt.utils import atomic_write_json
    atomic_write_json(path, summary)
    print_rows(summary)
    print(f"wrote {path}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
