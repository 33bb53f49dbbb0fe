"""The GPU check of the `flash` backend (FlashAttention-4): every variant's logits and gradients
against the eager reference in fp32, beside the eager math in bf16 as the scale of bf16 rounding,
at head dims 16 (forward only: FA4's backward is wrong there), 64 and 128; then one training step
compiled with fullgraph=True (no graph break: FA4 is one custom op) and captured as a CUDA graph,
against the eager step. Part of `python -m bench.gpu_check` (`--parts flash`)."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from bench.common import sync
from sqt import TransformerLM, flash, preset
from sqt.variants import VARIANTS

CASES = list(VARIANTS) + ["mha@128", "sqa@128", "table:xsqa", "rotary:gqa"]
HEAD_DIMS = {16: False, 64: True, 128: True}       # head dim -> check the backward too
N_HEADS, BATCH, SEQ = 4, 4, 256
# A flash error counts as bf16 rounding while it stays within this factor of the eager math's own
# bf16 error (or under the floor): a wrong kernel is off by tens of percent.
ROUNDING_FACTOR, ROUNDING_FLOOR = 5.0, 0.02


def _config(head_dim: int, layers: str, backend: str, **overrides):
    return preset("small", block="modern", layers=layers, d_model=N_HEADS * head_dim,
                  n_heads=N_HEADS, backend=backend, **overrides)


def _errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max abs error, relative error of the whole tensor by norms)."""
    got, want = got.double(), want.double()
    diff = got - want
    return float(diff.abs().max()), float(diff.norm() / want.norm().clamp_min(1e-30))


def _run(model, x, *, bf16: bool, grad: bool):
    """Logits, and with `grad` the gradients of the mean cross-entropy by parameter name."""
    model.zero_grad(set_to_none=True)
    kind = next(model.parameters()).device.type
    with torch.autocast(kind, torch.bfloat16, enabled=bf16), torch.set_grad_enabled(grad):
        logits = model(x)
    if not grad:
        return logits.detach(), {}
    F.cross_entropy(logits.float().flatten(0, 1), x.flatten()).backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                             if p.grad is not None}


def check_case(device, head_dim: int, layers: str, with_grad: bool) -> dict:
    row: dict = {"head_dim": head_dim, "layers": layers, "backward": with_grad}
    torch.manual_seed(0)
    model = TransformerLM(_config(head_dim, layers, "flash")).to(device).train(with_grad)
    ref = TransformerLM(dataclasses.replace(model.config, backend="eager")).to(device)
    ref.load_state_dict(model.state_dict())
    ref.train(with_grad)
    x = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), device=device)
    row["backends"] = sorted(set(model.backends(seq_len=SEQ)))
    t0 = time.perf_counter()
    out, grads = _run(model, x, bf16=True, grad=with_grad)
    sync(device)
    row["first_call_s"] = time.perf_counter() - t0            # FA4 compiles new shapes here
    want, want_grads = _run(ref, x, bf16=False, grad=with_grad)
    scale, scale_grads = _run(ref, x, bf16=True, grad=with_grad)
    row["out_max_abs"], row["out_rel"] = _errors(out, want)
    row["out_rel_eager_bf16"] = _errors(scale, want)[1]
    ok = row["out_rel"] <= max(ROUNDING_FACTOR * row["out_rel_eager_bf16"], ROUNDING_FLOOR)
    if with_grad:
        per = {n: _errors(g, want_grads[n]) for n, g in grads.items()}
        worst = max(per, key=lambda n: per[n][1])
        row["grad_max_abs"] = max(a for a, _ in per.values())
        row["grad_max_rel"], row["grad_worst_param"] = per[worst][1], worst
        row["grad_rel_eager_bf16"] = max(_errors(g, want_grads[n])[1]
                                         for n, g in scale_grads.items())
        ok = ok and row["grad_max_rel"] <= max(ROUNDING_FACTOR * row["grad_rel_eager_bf16"],
                                               ROUNDING_FLOOR)
    row["within_bf16_rounding"] = bool(ok)
    return row


def check_compiled_step(device, head_dim: int = 64) -> dict:
    """One forward+backward of a flash model compiled with fullgraph=True (FA4 must be one op to
    dynamo), then captured as a CUDA graph and replayed, each against the eager step."""
    torch.manual_seed(0)
    # Two layers: enough to compile what a deep model compiles, in half the compile time.
    model = TransformerLM(_config(head_dim, "gqa", "flash", n_layers=2)).to(device).train()
    x = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), device=device)

    def loss_fn(m):
        with torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
            logits = m(x)
        return F.cross_entropy(logits.float().flatten(0, 1), x.flatten())
    params = list(model.parameters())

    def step(fn):
        for p in params:
            if p.grad is not None:
                p.grad.zero_()             # kept in place: a captured graph writes into them
        loss = fn(model)
        loss.backward()
        # Detached: a loss that keeps its autograd graph keeps the AccumulateGrad nodes of the
        # default stream alive, and the capture on the side stream then fails.
        return loss.detach()
    want = step(loss_fn).detach().clone()
    want_grads = [p.grad.clone() for p in params]
    row: dict = {"head_dim": head_dim, "layers": "gqa", "fullgraph": "ok"}
    t0 = time.perf_counter()
    try:
        compiled = torch.compile(loss_fn, fullgraph=True)
        loss = step(compiled)
    except Exception as e:          # a graph break: say where, and go on with a plain compile
        row["fullgraph"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
        torch._dynamo.reset()
        compiled = torch.compile(loss_fn)
        loss = step(compiled)
    torch.cuda.synchronize(device)
    row["compile_s"] = time.perf_counter() - t0
    row["compiled_loss_rel"] = _errors(loss.detach(), want)[1]
    row["compiled_grad_max_rel"] = max(_errors(p.grad, g)[1] for p, g in zip(params, want_grads))
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            step(compiled)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(compiled)
    graph.replay()
    torch.cuda.synchronize(device)
    row["captured_loss_rel"] = _errors(captured.detach(), want)[1]
    row["captured_grad_max_rel"] = max(_errors(p.grad, g)[1] for p, g in zip(params, want_grads))
    return row


def _guarded(fn: Callable[[], dict], what: dict) -> dict:
    try:
        return {**what, **fn()}
    except Exception as e:              # recorded, and the check goes on with the next case
        msg = str(e).strip().splitlines()
        return {**what, "error": f"{type(e).__name__}: {(msg or [''])[0][:300]}"}


def check_flash(device, on_row: Optional[Callable[[dict], None]] = None) -> dict:
    reason = flash.unavailable_reason(device)
    if reason:
        print(f"flash: not checked ({reason})", flush=True)
        return {"available": False, "reason": reason}
    part = {"available": True, "entry": flash.kernels().source, "cases": [],
            "rounding_rule": f"within_bf16_rounding: error <= max({ROUNDING_FACTOR} x the eager "
                             f"math's own bf16 error, {ROUNDING_FLOOR}), against eager fp32",
            "shape": {"n_heads": N_HEADS, "batch": BATCH, "seq": SEQ, "preset": "small"}}
    print(f"flash entry: {part['entry']}", flush=True)
    for hd, with_grad in HEAD_DIMS.items():
        for layers in CASES:
            row = _guarded(lambda: check_case(device, hd, layers, with_grad),
                           {"head_dim": hd, "layers": layers})
            part["cases"].append(row)
            _print(row)
            if on_row:
                on_row(part)
    part["compiled_step"] = _guarded(lambda: check_compiled_step(device), {})
    print(f"compiled+captured step: {part['compiled_step']}", flush=True)
    return part


def _print(r: dict) -> None:
    head = f"flash hd{r['head_dim']:<4d} {r['layers']:12s}"
    if "error" in r:
        print(f"{head} ERROR {r['error']}", flush=True)
        return
    grads = (f" grads rel {r['grad_max_rel']:.1e} (eager bf16 {r['grad_rel_eager_bf16']:.1e})"
             if r["backward"] else " (forward only)")
    print(f"{head} {'ok ' if r['within_bf16_rounding'] else 'BAD'} out rel {r['out_rel']:.1e} "
          f"(eager bf16 {r['out_rel_eager_bf16']:.1e}){grads} first call "
          f"{r['first_call_s']:.1f}s", flush=True)
