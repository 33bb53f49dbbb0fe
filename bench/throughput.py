"""Long-sequence throughput of the MHA / GQA / MQA / SQA family, measured the honest way: each
case gets its own warm-up, cases run in a random order, CUDA-event timing with median and spread,
the matmul peak measured in the same run, and the kernel that ran recorded from the profiler.

    python -m bench.throughput                       # default grid, JSON + markdown + plot
    python -m bench.throughput --seqs 1024,4096 --variants mha,sqa --modes forward --list
    python -m bench.throughput --families sdpa,flash --op-families sdpa-cudnn,flash \
        --op-modes forward,train                     # FlashAttention-4 beside cuDNN

Results go to bench/results/throughput_<time>.json (rewritten after every case, so a killed run
keeps what it measured); at the end `python -m bench.report --run` writes the run's .md table
and log-log .png beside it and prints its criteria."""

from __future__ import annotations

import argparse
import pathlib
import random
import sys
import time

import torch

from bench.common import matmul_peak_tflops, report_run
from bench.throughput_cases import (MODEL_FAMILIES, MODELS, OP_FAMILIES, SDPA_FORCE, TRAIN_MODES,
                                    WINDOW_FAMILIES, compiled, head_dim_of, n_heads_of,
                                    run_case)
from sqt import flash
from sqt.kernels import AUTO_FLASH
from sqt.utils import allow_many_recompiles, atomic_write_json, run_record
from sqt.accounting import attention_flops, forward_flops
from sqt.variants import parse_layer

DEFAULT_SEQS = (1024, 4096, 32768, 131072, 200000)
DEFAULT_VARIANTS = ("mha", "gqa", "mqa", "sqa", "ssqa", "xsqa", "xsmqa", "lsqa",
                    "mha@128", "mha@4096", "sqa@128")
DEFAULT_MODELS = ("paper", "attn16", "attn64", "attn128")
# FlashAttention-4 (the flash families) is an optional install: asked for by name.
DEFAULT_FAMILIES = ("sdpa", "flex")
# Forced SDPA kernels are only shown at the op level, where they answer "what can each kernel
# reach"; the model-level sdpa family is pinned to one kernel by --sdpa-kernel.
DEFAULT_OP_FAMILIES = ("sdpa-flash", "sdpa-cudnn", "flex")
# FlexAttention is compiled per shape (heads, length, window): each flex case costs a compile of
# seconds, a training one more (backward). The default grid keeps flex to the rows the report
# compares on that family; `all` lifts a restriction. Every list is intersected with --variants.
DEFAULT_SUBSETS = {
    "flex_variants": ("mha", "sqa", "xsqa", "mha@128", "mha@4096", "sqa@128"),
    "flex_train_variants": ("mha", "mha@128", "sqa@128"),
    "op_variants": ("mha", "gqa", "sqa", "ssqa", "xsqa", "mha@128"),
    "op_flex_variants": ("mha",),
    "flash_variants": ("mha", "gqa", "sqa", "xsqa", "mha@128", "sqa@128"),
    "op_flash_variants": ("mha", "gqa", "xsqa", "mha@128"),
}
# The SQA paper's batches (its Table 3): 131072 tokens per step, at least one sequence.
PAPER_TOKENS_PER_STEP = 131072
MODE_COST = {"forward": 1.0, "train": 3.5,   # rough: backward ~2.5x forward for attention
             "train-ckpt": 4.5,            # plus the recomputed forward
             "train-compiled": 3.5, "train-ckpt-compiled": 4.5}


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _check_choices(flag: str, values, accepted) -> None:
    bad = [v for v in values if v not in accepted]
    if bad:
        raise ValueError(f"{flag}: unknown {', '.join(map(repr, bad))}; expected a comma list "
                         f"from {', '.join(accepted)}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default=",".join(map(str, DEFAULT_SEQS)),
                   help="sequence lengths (add 262144 for 256k where memory allows)")
    p.add_argument("--batches", default="",
                   help="batch per seq as seq:batch pairs; default the paper's (131072 tokens "
                        "per step up to 32k, then 1)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="variant names, nq/nkv, '@W' for a sliding window")
    p.add_argument("--modes", default="forward,train",
                   help="forward, train, train-ckpt (training step with every block recomputed "
                        "in the backward: fits longer sequences), train-compiled and "
                        "train-ckpt-compiled (the same through torch.compile, as `sqt train` "
                        "runs on CUDA)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"from {', '.join(MODELS)}")
    p.add_argument("--families", default=",".join(DEFAULT_FAMILIES),
                   help=f"model-level attention backends, from {', '.join(MODEL_FAMILIES)}")
    p.add_argument("--op-families", default=",".join(DEFAULT_OP_FAMILIES),
                   help=f"op-level kernels, from {', '.join(OP_FAMILIES)}")
    p.add_argument("--op-modes", default="forward",
                   help="op-level modes: forward, train (the op's forward and backward)")
    p.add_argument("--layer-memory-seqs", default="131072",
                   help="lengths at which model cases also measure one layer's peak memory "
                        "beside the unfused layout (CUDA only; 'all', or 'none')")
    for name, default in DEFAULT_SUBSETS.items():
        p.add_argument("--" + name.replace("_", "-"), default=",".join(default),
                       help="subset of --variants for that part ('all' for every one)")
    p.add_argument("--train-max-seq", type=int, default=131072,
                   help="longest length for train mode (a 200k training step of every variant "
                        "alone is minutes); 0 for no limit")
    p.add_argument("--sdpa-kernel", default="auto", choices=("auto",) + SDPA_FORCE,
                   help="SDPA kernel forced for the model-level sdpa family. auto = cudnn on "
                        "CUDA (torch 2.11's own choice on H100 for every head layout; forcing "
                        "makes a per-shape fallback an error instead of a silent switch), "
                        "torch's choice on the CPU")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per case (at most)")
    p.add_argument("--max-seconds", type=float, default=2.0,
                   help="per case: stop repeating once this is exceeded and 3 samples exist")
    p.add_argument("--budget-seconds", type=float, default=400.0,
                   help="whole run: cases predicted not to fit are recorded as skipped")
    p.add_argument("--profile", choices=("first", "all", "none"), default="first",
                   help="profile kernels at each series' first successful length, or every case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-size", type=int, default=8192, help="matmul size for the peak")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--list", action="store_true", help="print the planned cases and exit")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    a.seqs = [int(s) for s in _csv(a.seqs)]
    if not a.seqs or min(a.seqs) < 1:
        raise ValueError(f"--seqs={a.seqs}: expected positive integers")
    a.batches = {int(k): int(v) for k, v in (kv.split(":") for kv in _csv(a.batches))}
    for name in ("variants", "modes", "models", "families", "op_families", "op_modes"):
        setattr(a, name, _csv(getattr(a, name)))
    memory = a.layer_memory_seqs.strip()
    a.layer_memory_seqs = None if memory == "all" else set() if memory == "none" else {
        int(s) for s in _csv(memory)}
    _check_choices("--modes", a.modes, TRAIN_MODES + ("forward",))
    _check_choices("--op-modes", a.op_modes, ("forward", "train"))
    _check_choices("--models", a.models, tuple(MODELS))
    _check_choices("--families", a.families, MODEL_FAMILIES)
    _check_choices("--op-families", a.op_families, OP_FAMILIES)
    for v in a.variants:        # parse_layer's error lists the accepted names
        for m in a.models:
            parse_layer(v, n_heads_of(m))
    for name in DEFAULT_SUBSETS:
        value = getattr(a, name)
        setattr(a, name, set(a.variants) if value == "all" else set(_csv(value)))
    if a.repeats < 1:
        raise ValueError(f"--repeats={a.repeats}: expected >= 1")
    return a


def batch_for(seq: int, overrides: dict) -> int:
    if seq in overrides:
        return overrides[seq]
    return max(1, PAPER_TOKENS_PER_STEP // seq)


def _wanted(a, op: bool, mode: str, family: str, variant: str, window, head_dim: int) -> bool:
    if window and family not in WINDOW_FAMILIES:
        return False            # no sliding-window SDPA kernel: that row lives on flex, flash
    if family == "flash" and mode in TRAIN_MODES and head_dim not in flash.BACKWARD_CHECKED:
        return False            # FA4's backward is refused there (wrong at head dim 16)
    if op:
        subset = {"flex": a.op_flex_variants, "flash": a.op_flash_variants}.get(
            family, a.op_variants)
    elif family == "flex":
        subset = a.flex_train_variants if mode in TRAIN_MODES else a.flex_variants
    elif family == "flash":
        subset = a.flash_variants
    else:
        return True
    return variant in subset


def plan(a) -> list[dict]:
    """Every case, grouped in blocks of one (mode, seq). The longest forward block runs first:
    the criteria are measured there, so a budget cut must not reach it. Then the other forward
    blocks and the train blocks, each cheapest first, so a budget cut hits the longest of what
    remains. The order inside a block is random."""
    blocks: dict[tuple, list] = {}
    for model in a.models:
        op = MODELS[model]["kind"] == "op"
        for mode in (a.op_modes if op else a.modes):
            for family in (a.op_families if op else a.families):
                for variant in a.variants:
                    window = parse_layer(variant, n_heads_of(model)).window
                    if not _wanted(a, op, mode, family, variant, window, head_dim_of(model)):
                        continue
                    for seq in a.seqs:
                        if mode in TRAIN_MODES and a.train_max_seq and seq > a.train_max_seq:
                            continue
                        blocks.setdefault((mode, seq), []).append(dict(
                            model=model, part="op" if op else "model", mode=mode,
                            family=family, variant=variant, seq=seq,
                            batch=batch_for(seq, a.batches)))
    rng = random.Random(a.seed)

    def cost(key):
        mode, seq = key
        return MODE_COST[mode] * batch_for(seq, a.batches) * seq * seq
    cases = []
    longest = max((k[1] for k in blocks if k[0] == "forward"), default=None)
    first = ("forward", longest)
    for key in sorted(blocks, key=lambda k: (k != first, k[0] != "forward", cost(k))):
        block = blocks[key]
        rng.shuffle(block)
        cases.extend(block)
    for i, c in enumerate(cases):
        c["order"] = i
    return cases


def series_key(c: dict) -> tuple:
    return (c["part"], c["model"], c["mode"], c["family"], c["variant"])


def _work(c: dict) -> float:
    """Relative work of a case, for predicting a longer case from a shorter one of its series."""
    if c["part"] == "op":
        spec = parse_layer(c["variant"], n_heads_of(c["model"]))
        return attention_flops(spec, head_dim_of(c["model"]), c["batch"], c["seq"])
    from bench.throughput_cases import model_config
    cfg = model_config(c["model"], c["seq"], c["family"]).with_layers(c["variant"])
    return forward_flops(cfg, c["batch"], c["seq"])


def _skip_reason(c, elapsed, a, done) -> str | None:
    """Predict a case from the last result of its series; skip what cannot fit the budget, or
    what must run out of memory (a shorter case with no more tokens and no more T^2 did)."""
    prev = done.get(series_key(c))
    left = a.budget_seconds - elapsed
    if left <= 0:
        return f"budget: {a.budget_seconds:.0f} s used up"
    if prev is None:
        return None
    if prev["status"] == "oom":
        if (c["batch"] * c["seq"] >= prev["batch"] * prev["seq"]
                and c["batch"] * c["seq"] ** 2 >= prev["batch"] * prev["seq"] ** 2):
            return f"out of memory already at seq {prev['seq']} (batch {prev['batch']})"
        return None
    if prev["status"] != "ok":
        return None
    per_call = prev["seconds"] * _work(c) / _work(prev)
    predicted = per_call * (2 + 3)       # first call + a warm-up + the minimum 3 samples
    if c["family"] == "flex" or compiled(c["mode"]):   # a new shape compiles again, as long
        predicted += max(0.0, prev["first_call_s"] - prev["seconds"])
    if predicted > left:
        return (f"budget: predicted {predicted:.1f} s from seq {prev['seq']}, "
                f"{left:.1f} s left")
    return None


def main(argv=None) -> dict:
    a = parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and device.index is None:
        # Tensors report 'cuda:0'; sqt.kernels keys its block-mask cache by str(device).
        device = torch.device("cuda", torch.cuda.current_device())
    a.sdpa_force = ("cudnn" if device.type == "cuda" else "none") \
        if a.sdpa_kernel == "auto" else a.sdpa_kernel
    cases = plan(a)
    if a.list:
        for c in cases:
            print(f"{c['order']:4d} {c['mode']:7s} {c['model']:8s} {c['family']:14s} "
                  f"{c['variant']:9s} seq={c['seq']} batch={c['batch']}")
        print(f"{len(cases)} cases")
        return {"cases": cases}
    if any(c["family"] == "flex" and device.type == "cuda" or compiled(c["mode"])
           for c in cases):
        allow_many_recompiles()         # importing dynamo costs seconds: only when it compiles
    torch.manual_seed(a.seed)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out_dir = pathlib.Path(a.out)
    json_path = out_dir / f"throughput_{stamp}.json"
    start = time.perf_counter()
    peak_start = matmul_peak_tflops(device, n=a.peak_size)
    result = {
        "benchmark": "throughput", "schema": 1, "run": run_record(device),
        "settings": {
            "argv": list(sys.argv[1:] if argv is None else argv),
            "seqs": a.seqs, "variants": a.variants, "modes": a.modes, "models": a.models,
            "families": a.families, "op_families": a.op_families, "op_modes": a.op_modes,
            **{name: sorted(getattr(a, name)) for name in DEFAULT_SUBSETS},
            "train_max_seq": a.train_max_seq, "sdpa_kernel": a.sdpa_force,
            "auto_flash": {str(hd): {"min_seq_forward": w.min_seq_forward,
                                     "min_seq_train": w.min_seq_train}
                           for hd, w in AUTO_FLASH.items()},
            "repeats": a.repeats, "max_seconds": a.max_seconds,
            "budget_seconds": a.budget_seconds, "seed": a.seed,
            "forward": "model.eval(), torch.inference_mode(), bf16 autocast (fp32 weights)",
            "train": "model.train() dropout 0, bf16 autocast, cross-entropy, backward, "
                     "fused AdamW step, zero_grad",
            "train-ckpt": "as train, with every block recomputed in the backward "
                          "(LMConfig.checkpoint_blocks); FLOPs credited without the recompute",
            "train-compiled": "as train, forward and loss through torch.compile",
            "train-ckpt-compiled": "as train-ckpt, forward and loss through torch.compile",
            "op": "sqt.kernels.attend on random bf16 q/k/v, causal, inference_mode",
            "op_method": "q, k, v are (B, H, T, D) views of one (B, T, W) buffer, as the "
                         "model's fused projection makes them; op train: forward and backward, "
                         "FLOPs credited 3.5x the forward's (FlashAttention's count)",
            "compiled": "model not compiled (eager PyTorch) except in the *-compiled modes "
                        "(forward and loss through torch.compile, default mode, as `sqt train` "
                        "on CUDA); FlexAttention compiled per shape by sqt.kernels, "
                        "FlashAttention-4 per head dim and head ratio by its own JIT (compile "
                        "time excluded: first call)",
            "kernel_time": "profiled cases: kernel_ms, every CUDA kernel's time in one profiled "
                           "call, and attention_kernel_ms, the attention kernels' share of it "
                           "(forward, backward and their helpers)",
            "weights": "one seed per (model, variant, length, batch): every family and mode of "
                       "a cell starts from the same weights and batch (first_step_loss, "
                       "first_step_grad_norm: the first training step's, before any update)",
            "layer_memory": "layer_mem_mib: peak memory above weights and input of the first "
                            "layer alone (sqt's fused layer, and the same layer unfused: three "
                            "projections, RoPE into new tensors, same op), inference-mode forward "
                            "or forward+backward, bf16 autocast, at lengths "
                            + ("all" if a.layer_memory_seqs is None else
                               ",".join(map(str, sorted(a.layer_memory_seqs))) or "none"),
        },
        "models": {m: dict(MODELS[m], n_heads=n_heads_of(m), head_dim=head_dim_of(m))
                   for m in a.models},
        "matmul_peak_tflops": {"start": peak_start},
        "cases": [], "complete": False,
    }
    done: dict[tuple, dict] = {}
    profiled: set = set()
    for c in cases:
        elapsed = time.perf_counter() - start
        reason = _skip_reason(c, elapsed, a, done)
        if reason:
            rec = {**c, "status": "skipped", "reason": reason}
        else:
            want_profile = a.profile == "all" or (a.profile == "first"
                                                  and series_key(c) not in profiled)
            rec = {**c, **run_case(c, a, device, want_profile)}
            if "kernel_family" in rec:
                profiled.add(series_key(c))
            done[series_key(c)] = rec
        result["cases"].append(rec)
        _print_case(rec)
        result["elapsed_s"] = time.perf_counter() - start
        atomic_write_json(json_path, result)
    result["matmul_peak_tflops"]["end"] = matmul_peak_tflops(device, n=a.peak_size)
    result["elapsed_s"] = time.perf_counter() - start
    result["complete"] = True
    atomic_write_json(json_path, result)
    print()
    report_run(json_path, "--out", str(json_path.with_suffix(".md")),
               *(["--no-plot"] if a.no_plot else []))
    print(f"\nwrote {json_path} in {result['elapsed_s']:.0f} s")
    return result


def _print_case(r: dict) -> None:
    head = (f"[{r['order']:3d}] {r['mode']:7s} {r['model']:7s} {r['family']:14s} "
            f"{r['variant']:9s} {r['seq']:>6d}x{r['batch']:<3d} ")
    if r["status"] != "ok":
        print(head + f"{r['status'].upper()}: {r.get('reason', '')}", flush=True)
        return
    t = r["timing"]
    tflops = r["step_flops"] / r["seconds"] / 1e12
    mem = f" {r['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in r else ""
    kern = f" [{r['kernel_family']}]" if "kernel_family" in r else ""
    loss = f" loss {r['first_step_loss']:.5f}" if "first_step_loss" in r else ""
    layer = r.get("layer_mem_mib", {})
    layer = (f" layer {layer['sqt']:.0f}/{layer['unfused']:.0f} MiB (fused/unfused)"
             if "sqt" in layer else f" layer memory {layer['status']}" if layer else "")
    print(head + f"{r['seconds']:.4f} s (IQR {t['q1_ms']/1e3:.4f}-{t['q3_ms']/1e3:.4f}, "
          f"n={t['n']}) {tflops:.1f} TFLOP/s{mem}{kern}{loss}{layer}", flush=True)


if __name__ == "__main__":
    main()
