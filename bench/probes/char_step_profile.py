"""Where a character-grid training step spends its GPU time: kernels of a few steps of `sqt
train`'s own compiled step, profiled, grouped as matmul / attention / fused elementwise (inductor's
Triton kernels) / optimizer / other, per step. It answers whether the grid can be made faster by
packing runs (idle GPU between small kernels) or only by doing less work per step.

    PYTHONPATH=src:. python -m bench.probes.char_step_profile --out DIR [--sizes medium small tiny]

Profiled without CUDA-graph capture, so the profiler sees each kernel (capture removes launch gaps,
not kernel time); the captured step's ms/step comes from a second, short run of the same recipe."""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch

from bench.throughput_cases import kernel_kind
from sqt.data import load_dataset
from sqt.runconfig import recipe
from sqt.train import train
from sqt.utils import run_record

PROFILE_FROM, PROFILE_STEPS = 30, 10
CAPTURED_STEPS = 300


def kernel_group(name: str) -> str:
    n = name.lower()
    if kernel_kind(name):
        return "attention"
    if any(h in n for h in ("gemm", "xmma", "nvjet", "cutlass", "sm90_", "sm80_")):
        return "matmul"
    if "adam" in n or "multi_tensor" in n or "foreach" in n:
        return "optimizer"
    if n.startswith("triton_") or "triton" in n:
        return "fused elementwise"
    return "other"


def profile_run(size: str, layers: str, data, device: str, **overrides) -> dict:
    from torch.profiler import ProfilerActivity, profile
    steps = PROFILE_FROM + PROFILE_STEPS + 2
    mcfg, tcfg = recipe(size, vocab_size=data.tokenizer.vocab_size, layers=layers, seed=0,
                        device=device, steps=steps, eval_every=10_000, cuda_graph=False,
                        **overrides)
    prof = profile(activities=[ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU])

    def callback(step: int) -> None:
        if step in (PROFILE_FROM, PROFILE_FROM + PROFILE_STEPS) and device == "cuda":
            torch.cuda.synchronize()
        if step == PROFILE_FROM:
            prof.start()
        elif step == PROFILE_FROM + PROFILE_STEPS:
            prof.stop()
    train(mcfg, tcfg, data, label=f"{size}/{layers}", callback=callback)
    groups: dict[str, float] = {}
    kernels: dict[str, float] = {}
    launches = 0
    for e in prof.key_averages():
        if device == "cuda" and not str(e.device_type).endswith("CUDA"):
            continue
        ms = e.self_device_time_total / 1e3 / PROFILE_STEPS
        groups[kernel_group(e.key)] = groups.get(kernel_group(e.key), 0.0) + ms
        kernels[e.key[:160]] = ms
        launches += e.count
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    return {"size": size, "layers": layers, "overrides": overrides,
            "kernel_ms_per_step": sum(groups.values()),
            "groups_ms_per_step": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
            "kernels_per_step": launches / PROFILE_STEPS,
            "top_kernels_ms_per_step": dict(top)}


def captured_ms(size: str, layers: str, data, device: str, **overrides) -> float:
    """ms/step of the recipe's captured step (the trainer's own steady-state timing)."""
    mcfg, tcfg = recipe(size, vocab_size=data.tokenizer.vocab_size, layers=layers, seed=0,
                        device=device, steps=CAPTURED_STEPS, eval_every=10_000, **overrides)
    return train(mcfg, tcfg, data, label=f"{size}/{layers}")["ms_per_step"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.probes.char_step_profile")
    p.add_argument("--sizes", nargs="+", default=["medium"])
    p.add_argument("--layers", default="mha")
    p.add_argument("--no-dropout-too", action="store_true",
                   help="also profile each size with dropout 0 (what the recipe's dropout costs)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    data = load_dataset("tinyshakespeare")
    out = {"probe": "char_step_profile", "run": run_record(torch.device(a.device)),
           "method": __doc__, "profiled_steps": PROFILE_STEPS, "cases": []}
    t0 = time.perf_counter()
    path = pathlib.Path(a.out) / "char_step_profile.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for size in a.sizes:
        for extra in ([{}, {"dropout": 0.0}] if a.no_dropout_too else [{}]):
            case = profile_run(size, a.layers, data, a.device, **extra)
            case["captured_ms_per_step"] = captured_ms(size, a.layers, data, a.device, **extra)
            out["cases"].append(case)
            print(json.dumps(case, indent=1), flush=True)
            out["elapsed_s"] = time.perf_counter() - t0
            path.write_text(json.dumps(out, indent=1) + "\n")     # a killed run keeps its cases
    return out


if __name__ == "__main__":
    main()
