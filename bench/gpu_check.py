"""A CUDA check of the core, which the CPU test suite cannot cover: every variant's backends agree
on the GPU, compiled forward+backward runs, and which attention kernels ran; a rough
training-step probe per size preset; and FlashAttention-4 (`flash`) against the eager reference
for every variant at head dims 16 (forward only), 64 and 128, plus its compiled and captured
training step. `python -m bench.gpu_check --out DIR [--parts variants,train,flash]`."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import attention_kernel_names, time_fn
from bench.gpu_check_flash import check_flash
from sqt import TransformerLM, preset
from sqt.utils import atomic_write_json, run_record
from sqt.variants import VARIANTS

CASES = list(VARIANTS) + ["mha@128", "sqa@128", "table:xsqa", "rotary:gqa"]
PARTS = ("variants", "train", "flash")


def attention_kernels(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return attention_kernel_names(e.name for e in prof.events()
                                  if e.device_type.name == "CUDA")


def check_variants(device) -> list[dict]:
    rows = []
    for block in ("classic", "modern"):
        for layers in CASES:
            cfg = preset("small", block=block, layers=layers)
            torch.manual_seed(0)
            base = TransformerLM(cfg).to(device).eval()
            x = torch.randint(0, cfg.vocab_size, (4, 256), device=device)
            row = {"block": block, "layers": layers, "backends": base.backends()}
            with torch.no_grad():
                ref = TransformerLM(dataclasses.replace(cfg, backend="eager")).to(device).eval()
                ref.load_state_dict(base.state_dict())
                want = ref(x).double()
                got = base(x).double()
                row["rel_err_fp32_vs_eager"] = float((got - want).norm() / want.norm())
                with torch.autocast("cuda", torch.bfloat16):
                    got16 = base(x).double()
                row["rel_err_bf16_vs_eager"] = float((got16 - want).norm() / want.norm())
            # Uncompiled here (compile is exercised by the training probe below).
            model = TransformerLM(cfg).to(device).train()
            with torch.autocast("cuda", torch.bfloat16):
                loss = F.cross_entropy(model(x).flatten(0, 1).float(), x.flatten())
            loss.backward()
            row["loss_finite"] = bool(torch.isfinite(loss))
            row["grads_finite"] = all(bool(torch.isfinite(p.grad).all())
                                      for p in model.parameters() if p.grad is not None)
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                row["kernels"] = attention_kernels(lambda: base(x))
            rows.append(row)
            print(f"{block:8s} {layers:12s} {row['backends'][0]:6s} "
                  f"fp32 {row['rel_err_fp32_vs_eager']:.1e} bf16 {row['rel_err_bf16_vs_eager']:.1e} "
                  f"grads ok {row['grads_finite']} "
                  f"{','.join(k[:40] for k in row['kernels'])}", flush=True)
    return rows


def probe_train_steps(device) -> list[dict]:
    """A plain compiled loop (fused AdamW, bf16 autocast, data already on the GPU) per size."""
    rows = []
    for size in ("tiny", "small", "medium"):
        for layers in ("mha", "sqt"):
            cfg = preset(size, layers=layers)
            model = TransformerLM(cfg).to(device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
            cmodel = torch.compile(model)
            x = torch.randint(0, cfg.vocab_size, (64, 257), device=device)

            def step():
                with torch.autocast("cuda", torch.bfloat16):
                    logits = cmodel(x[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            stats = time_fn(step, device, warmup=5, repeats=50)
            rows.append({"size": size, "layers": layers, "compile_s": compile_s, **stats})
            print(f"{size:7s} {layers:4s} compile {compile_s:5.1f}s  "
                  f"{stats['median_ms']:.2f} ms/step", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--file", default="gpu_check.json", help="the JSON's name under --out")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma list from {', '.join(PARTS)}")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or set(parts) - set(PARTS):
        ap.error(f"--parts={args.parts!r}: expected a comma list from {', '.join(PARTS)}")
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu_check needs a CUDA device")
    device = torch.device("cuda", torch.cuda.current_device())
    torch.backends.cuda.matmul.allow_tf32 = True
    result = {"run": run_record(device), "parts": parts}
    path = args.out / args.file

    def save():                     # after every part: a killed run keeps what it checked
        atomic_write_json(path, result)
    for part, run in (("variants", check_variants), ("train", probe_train_steps),
                      ("flash", lambda d: check_flash(d, on_row=save_into(result, save)))):
        if part in parts:
            print(f"== {part}", flush=True)
            result["train_probe" if part == "train" else part] = run(device)
            save()
    print(f"wrote {path}")


def save_into(result: dict, save):
    """A callback that keeps the flash rows checked so far in the result and writes it."""
    def on_row(flash_part: dict):
        result["flash"] = flash_part
        save()
    return on_row


if __name__ == "__main__":
    main()
