"""The quality benchmark: SQA's quality claims tested in their own regime, one command each.

    python -m bench.quality dense --corpus enwiki_100M.txt.gz [--max-minutes 8.5]
    python -m bench.quality micro --corpus gutenberg_100M.txt.gz --secondary tinystories_lower.txt

Each prepares its corpus (sqt.data.prepare, idempotent) and trains a grid of variants x seeds at
one token budget (bench/quality_grid.py). Runs are recorded one JSON each under
bench/results/quality/<regime>-<role>-<corpus>-<grid id>/runs/, so a grid runs in parts: an
invocation trains what its folder lacks (--variants, --seeds/--seed-list narrow it), --max-minutes
stops it from starting what cannot end in time, and running the same command again goes on. The
report merges every part of a grid by its identity; `--plan` says what is left."""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()   # before torch is imported: a part's wall counts it

import argparse
import math
import sys
from pathlib import Path

from sqt.utils import atomic_write_json

from . import quality_grid as qg
from .gpus import add_gpus_argument, check_gpus


def prepare_grid(regime: qg.Regime, role: str, corpus: Path, args, device_type: str) -> dict:
    """Prepare the corpus (or find it prepared), resolve the budget and the recipe, and read the
    grid's folder: a description of the grid and its runs still to train."""
    from sqt.data import prepare
    from sqt.runconfig import recipe
    second = regime.secondary if role == "secondary" else None
    val_fraction = second["val_fraction"] if second else regime.val_fraction
    tokenizer = args.tokenizer or regime.tokenizer
    data_dir = Path(args.data_dir) / (f"{qg.corpus_stem(corpus.name)}-"
                                      f"{tokenizer.replace(':', '').replace('/', '_')}-val"
                                      f"{val_fraction:g}")
    data = prepare(corpus, tokenizer, data_dir, val_fraction=val_fraction)
    described = data.describe()
    if second:      # --tokens/--epochs are the primary grid's; the secondary has its own
        asked = ({"epochs": args.secondary_epochs} if args.secondary_epochs
                 else second["budget"])
    else:
        asked = ({"tokens": args.tokens} if args.tokens else {"epochs": args.epochs}
                 if args.epochs else regime.budget)
    overrides = {"batch_size": args.batch_size, "seq_len": args.seq_len,
                 "eval_batches": args.eval_batches or (regime.eval_batches if device_type == "cuda"
                                                       else None),
                 "compile": False if args.no_compile else None,
                 "cuda_graph": False if args.no_cuda_graph else None,
                 "progress": False, "log": False}
    probe_cfg, probe_train = recipe(regime.preset, device_type=device_type,
                                    vocab_size=described["vocab_size"], **overrides)
    steps = args.steps or qg.resolve_steps(asked, described["train_tokens"],
                                           probe_train.batch_size * probe_train.seq_len)
    overrides.update(steps=steps, eval_every=max(1, math.ceil(steps / regime.eval_points)))
    mcfg, tcfg = recipe(regime.preset, device_type=device_type,
                        vocab_size=described["vocab_size"], **overrides)
    ident = qg.identity(regime, role, mcfg, tcfg, described,
                        {"steps": steps} if args.steps else asked)
    folder = qg.grid_folder(Path(args.out), ident)
    runs = qg.read_runs(folder)
    about = second["about"] if second else regime.about
    atomic_write_json(folder / "grid.json", {"kind": "quality_grid", "id": qg.grid_id(ident),
                                             "identity": ident, "about": about,
                                             "variants": {k: v if isinstance(v, str) else list(v)
                                                          for k, v in regime.variants.items()}})
    todo = [(label, seed) for label in args.variants for seed in args.seed_list
            if not (runs.get((label, seed), {}).get("status") == "ok" or (
                runs.get((label, seed), {}).get("status") == "failed" and not args.retry_failed))]
    return {"role": role, "ident": ident, "id": qg.grid_id(ident), "folder": folder,
            "data_dir": str(data_dir), "runs": runs, "todo": todo, "overrides": overrides,
            "estimates": qg.prior_estimates(runs)}


def plan_lines(grid: dict, args) -> list[str]:
    ident, runs = grid["ident"], grid["runs"]
    ok = [r for r in runs.values() if r.get("status") == "ok"]
    per_run = (sum(r["gpu_s"] or 0 for r in ok) / len(ok)) if ok else None
    lines = [f"{ident['regime']} {grid['role']}: {grid['folder']}",
             f"  budget {ident['budget']['tokens']:,} tokens = {ident['budget']['steps']} steps of "
             f"{ident['budget']['tokens_per_step']:,} ({ident['budget']['epochs']:.2f} epochs of "
             f"{ident['train_tokens']:,}); asked {ident['budget']['asked']}",
             f"  trained {len(ok)}, failed "
             f"{sum(r.get('status') == 'failed' for r in runs.values())}, to train in this part "
             f"{len(grid['todo'])}: "
             + (", ".join(f"{v}/s{s}" for v, s in grid["todo"]) or "nothing")]
    if per_run:
        lines.append(f"  at {per_run:.0f} s of device time a run (mean so far), what is left "
                     f"needs about {per_run * len(grid['todo']) / 60:.1f} min of training at one "
                     "slot")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="regime", required=True, metavar="{dense,micro}")
    for name, regime in qg.REGIMES.items():
        r = sub.add_parser(name, help=regime.about, description=regime.about)
        r.add_argument("--corpus", type=Path, required=True,
                       help="the corpus (.txt or .txt.gz): " + (
                           "enwiki_100M.txt.gz" if name == "dense" else "gutenberg_100M.txt.gz"))
        if regime.secondary:
            r.add_argument("--secondary", type=Path, default=None,
                           help="a second corpus trained as its own grid: tinystories_lower.txt")
            r.add_argument("--secondary-epochs", type=float, default=None,
                           help=f"its budget (default {regime.secondary['budget']})")
        r.add_argument("--variants", nargs="+", default=list(regime.variants),
                       help=f"of {', '.join(regime.variants)} (default all)")
        seeds = r.add_mutually_exclusive_group()
        seeds.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
        seeds.add_argument("--seed-list", type=int, nargs="+", default=None,
                           help="these seeds only (a part of the grid)")
        budget = r.add_mutually_exclusive_group()
        budget.add_argument("--tokens", type=int, default=None,
                            help="token budget a run (default: the regime's "
                                 f"{regime.budget}), resolved once on the training split")
        budget.add_argument("--epochs", type=float, default=None,
                            help="budget in epochs of the training split")
        budget.add_argument("--steps", type=int, default=None,
                            help="budget in steps (smoke tests; the grid's identity says so)")
        r.add_argument("--data-dir", default="data/prepared",
                       help="where prepared corpora go (default data/prepared, git-ignored)")
        r.add_argument("--tokenizer", default=None,
                       help=f"sqt prepare's spec (default {regime.tokenizer})")
        r.add_argument("--jobs", type=int, default=None,
                       help=f"worker processes (default {regime.jobs} on CUDA, 1 on the CPU)")
        r.add_argument("--device-slots", type=int, default=1,
                       help="runs training at once on the GPU (default 1; more with --mps)")
        add_gpus_argument(r)
        r.add_argument("--mps", action="store_true",
                       help="serve the workers through CUDA MPS (see bench.packing_check)")
        r.add_argument("--max-minutes", type=float, default=None,
                       help="start no run that cannot end this long after the process started")
        r.add_argument("--retry-failed", action="store_true",
                       help="train again the runs recorded as failed (default: keep them)")
        r.add_argument("--plan", action="store_true",
                       help="prepare, then only say what the grid holds and what is left")
        r.add_argument("--sample-tokens", type=int, default=64,
                       help="tokens generated for each of the 3 fixed prompts (default 64; 0: "
                            "no samples)")
        r.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
        r.add_argument("--seq-len", type=int, default=None, help="default: the recipe's")
        r.add_argument("--eval-batches", type=int, default=None,
                       help=f"default {regime.eval_batches} on CUDA, the recipe's on the CPU")
        r.add_argument("--no-compile", action="store_true",
                       help="train eagerly (default: compiled on CUDA, eager on the CPU)")
        r.add_argument("--no-cuda-graph", action="store_true",
                       help="launch every step's kernels (default: one captured graph on CUDA)")
        r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
        r.add_argument("--out", default="bench/results",
                       help="results folder; grids go under OUT/quality (default bench/results)")
    return p


def check(args, regime: qg.Regime) -> None:
    from sqt.accounting import param_count
    from sqt.config import preset
    unknown = [v for v in args.variants if v not in regime.variants]
    if unknown:
        raise ValueError(f"--variants {unknown[0]!r}: expected some of "
                         f"{', '.join(regime.variants)}")
    for name in ("seeds", "jobs", "device_slots", "tokens", "steps", "batch_size", "seq_len",
                 "eval_batches"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')}={v}: expected >= 1")
    for name in ("epochs", "max_minutes", "secondary_epochs"):
        v = getattr(args, name, None)
        if v is not None and not v > 0:
            raise ValueError(f"--{name.replace('_', '-')}={v}: expected a number > 0")
    if args.sample_tokens < 0:
        raise ValueError(f"--sample-tokens={args.sample_tokens}: expected >= 0")
    if args.seed_list is not None and min(args.seed_list) < 0:
        raise ValueError(f"--seed-list {args.seed_list}: expected seeds >= 0")
    check_gpus(args.gpus, args.device)
    for corpus in (args.corpus, getattr(args, "secondary", None)):
        if corpus is not None and not corpus.is_file():
            raise ValueError(f"corpus {str(corpus)!r} does not exist: expected a text file")
    for v in args.variants:
        param_count(preset(regime.preset, layers=regime.variants[v]))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    regime = qg.REGIMES[args.regime]
    args.seed_list = sorted(set(args.seed_list)) if args.seed_list else list(range(args.seeds))
    try:
        check(args, regime)
        return run(args, regime)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args, regime: qg.Regime) -> int:
    from sqt.utils import resolve_device, run_record
    from .common import matmul_peak_tflops
    device = resolve_device(args.device, name="--device")
    t_prep = time.perf_counter()
    grids = [prepare_grid(regime, "primary", args.corpus, args, device.type)]
    if getattr(args, "secondary", None) is not None:
        grids.append(prepare_grid(regime, "secondary", args.secondary, args, device.type))
    prepare_s = time.perf_counter() - t_prep
    for g in grids:
        print("\n".join(plan_lines(g, args)), flush=True)
    if args.plan:
        return 0
    from .grid_part import run_part
    peak = matmul_peak_tflops(device)   # this process's CUDA context, made before MPS starts
    return run_part(args, regime, grids, device=device, peak=peak, prepare_s=prepare_s,
                    record=run_record(device), process_start=PROCESS_START)


if __name__ == "__main__":
    sys.exit(main())
