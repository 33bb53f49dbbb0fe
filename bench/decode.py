"""Decode benchmark: tokens/s and per-token latency of our eager loop (sqt.generate), our decode
engine (sqt.engine, CUDA graphs) and Hugging Face `GPT2LMHeadModel.generate`, side by side in
one run; prefill latency; KV-cache bytes per token; the bytes-moved bound of a decode step.

`python -m bench.decode [--out DIR] [--sizes ...] [--variants ...] [--batches ...]
[--contexts ...] [--max-seconds S]`. Defaults fit in about six minutes on one H100.

Method (also written into the JSON):
- Weights are random (decode speed does not depend on them), bf16 on CUDA, fp32 on the CPU.
- "context" is the cache length reached at the end of the timed tokens: the prompt is
  `context - new_tokens` long and `new_tokens` tokens are decoded greedily.
- Engine: one CUDA event pair around `new_tokens` graph-replayed steps (greedy argmax included),
  divided by `new_tokens`. The cache is filled once with random keys and values and positioned
  at the prompt length without a prefill; the first tokens are random. Prefill is timed on its
  own.
- Eager loop and Hugging Face: per token = (time(prompt -> N tokens) - time(prompt -> 1 token))
  / (N - 1), which removes the prefill and the first token from both.
- Every figure is a median over repeats with its quartiles (bench.common.time_fn).
- The bytes-moved bound of a step is (weights read + K/V read) / copy bandwidth, the
  bandwidth measured in the same run by a large device-to-device copy.
The seed sizes (tiny/small/medium) have learned positions of 256, so only context 256 fits them.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import time
from typing import Optional

import torch

from bench.common import copy_bandwidth_gbs, report_run, summarize, time_fn
from bench.engine_steps import greedy_steps, kernel_profile
from sqt.accounting import kv_bytes_per_token, weight_bytes_per_decode_step
from sqt.config import PRESETS, SEED_SIZES, LMConfig
from sqt.engine import DecodeEngine
from sqt.generate import generate
from sqt.model import TransformerLM
from sqt.utils import atomic_write_json, run_record
from sqt.variants import hybrid_layers

SIZES = {name: PRESETS[name] for name in SEED_SIZES}
# A larger model for long contexts: RoPE (no length limit but the SQT table), SwiGLU, vocab 65 so
# the comparison is about the transformer and its cache, not a 32k-entry LM head.
SIZES["large"] = dict(vocab_size=65, d_model=1024, n_heads=16, n_layers=16, d_ff=2816,
                      max_seq_len=16384 + 512, block="modern")
VARIANTS = ("mha", "gqa", "mqa", "sqa", "ssqa", "xsqa", "sqt", "hybrid")


def layers_for(variant: str, n_layers: int):
    # The seed's hybrid: the first half of the layers SQT, the rest standard.
    return hybrid_layers(n_layers, n_layers // 2) if variant == "hybrid" else variant


def build(size: str, variant: str, device, dtype) -> TransformerLM:
    cfg = LMConfig(**SIZES[size])
    cfg = cfg.with_layers(layers_for(variant, cfg.n_layers))
    torch.manual_seed(0)
    with torch.device(device):
        model = TransformerLM(cfg)
    return model.to(dtype).eval()


def bytes_per_element(model: TransformerLM) -> int:
    return model.tok_emb.weight.element_size()


def per_token_by_difference(fn_n, fn_1, n: int, device, repeats: int, max_seconds) -> dict:
    """Per-token time of a loop that prefills, from time(N tokens) - time(1 token)."""
    t_n = time_fn(fn_n, device, warmup=1, repeats=repeats, max_seconds=max_seconds)
    t_1 = time_fn(fn_1, device, warmup=1, repeats=repeats, max_seconds=max_seconds)
    per = (t_n["median_ms"] - t_1["median_ms"]) / (n - 1)
    # Spread: the quartiles of the N-token run, less the median 1-token run.
    return {"median_ms": per, "q1_ms": (t_n["q1_ms"] - t_1["median_ms"]) / (n - 1),
            "q3_ms": (t_n["q3_ms"] - t_1["median_ms"]) / (n - 1), "n": t_n["n"],
            "total_n_ms": t_n, "total_1_ms": t_1}


def hf_model(size: str, device, dtype):
    """GPT-2 with our dimensions and random weights. For the modern-block size the GPT-2 block
    differs (GELU MLP, learned positions); its MLP width is set to match SwiGLU's parameters."""
    from transformers import GPT2Config, GPT2LMHeadModel
    s = SIZES[size]
    inner = s["d_ff"] if s.get("block", "classic") == "classic" else s["d_ff"] * 3 // 2
    cfg = GPT2Config(vocab_size=s["vocab_size"], n_embd=s["d_model"], n_layer=s["n_layers"],
                     n_head=s["n_heads"], n_inner=inner, n_positions=s["max_seq_len"],
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).to(device=device, dtype=dtype).eval()


class Runner:
    def __init__(self, args, device, dtype):
        self.args, self.device, self.dtype = args, device, dtype
        self.deadline = time.perf_counter() + args.max_seconds
        self.rows: list[dict] = []
        self.skipped: list[str] = []
        self.mem_budget = (torch.cuda.get_device_properties(device).total_memory * 0.6
                           if device.type == "cuda" else 4e9)

    def out_of_time(self, what: str) -> bool:
        if time.perf_counter() > self.deadline:
            self.skipped.append(f"{what} (time budget --max-seconds={self.args.max_seconds})")
            return True
        return False

    def contexts(self, size: str) -> list[int]:
        limit = SIZES[size]["max_seq_len"]
        rope = SIZES[size].get("block", "classic") == "modern"
        return [c for c in self.args.contexts if c <= limit and (c <= 4096 or rope)]

    @torch.no_grad()
    def engine_case(self, size, variant, model, batch, ctx) -> Optional[dict]:
        a, dev = self.args, self.device
        new = min(a.new_tokens, ctx - 1)
        prompt = ctx - new
        kv_tok = kv_bytes_per_token(model.config, bytes_per_element=bytes_per_element(model))
        cache_bytes = kv_tok * batch * ctx
        row = {"size": size, "variant": variant, "batch": batch, "context": ctx,
               "new_tokens": new, "kv_bytes_per_token": kv_tok, "cache_bytes": cache_bytes,
               "params": model.num_params(), "layers": [s.name for s in model.specs]}
        if cache_bytes > self.mem_budget:
            row["status"] = f"skipped: cache {cache_bytes / 1e9:.1f} GB > budget"
            return row
        compiled = size in a.compile_sizes and batch in a.compile_batches
        row["compiled"] = compiled
        engine = DecodeEngine(model, batch, ctx, bucket=a.bucket, compile=compiled)
        run = greedy_steps(engine, prompt, new)
        t = time_fn(run, dev, warmup=2, repeats=a.repeats, max_seconds=a.case_seconds)
        per = {k: v / new for k, v in t.items() if k.endswith("_ms")}
        row["engine"] = {**per, "n": t["n"], "tokens_per_s": batch * 1e3 / per["median_ms"]}
        # Bytes-moved bound over the timed steps: K/V read up to the current length (ideal) and
        # up to the bucket the engine actually attends over.
        mean_len = prompt + (new + 1) / 2
        buckets = [min(ctx, -(-(p + 1) // a.bucket) * a.bucket) for p in range(prompt, ctx)]
        w = weight_bytes_per_decode_step(model.config, batch,
                                         bytes_per_element=bytes_per_element(model))
        ideal = w + kv_tok * batch * mean_len
        actual = w + kv_tok * batch * sum(buckets) / len(buckets)
        row["bytes_per_step"] = {"weights": w, "kv_ideal": ideal - w, "kv_engine": actual - w}
        if self.bandwidth:
            bound_ms = ideal / (self.bandwidth * 1e9) * 1e3
            row["bound"] = {"ms_per_token": bound_ms,
                            "fraction_of_bound": bound_ms / per["median_ms"],
                            "engine_view_ms": actual / (self.bandwidth * 1e9) * 1e3}
        if size in a.profile_sizes and batch == 1:
            row["kernels"] = kernel_profile(engine, prompt)
        if batch * ctx <= a.prefill_tokens:
            idx = torch.randint(model.config.vocab_size, (batch, prompt), device=dev)
            row["prefill"] = time_fn(lambda: engine.prefill(idx), dev, warmup=1,
                                     repeats=max(3, a.repeats // 2), max_seconds=a.case_seconds)
        row["status"] = "ok"
        return row

    @torch.no_grad()
    def eager_case(self, model, batch, ctx) -> dict:
        a = self.args
        n = min(a.eager_tokens, ctx - 1)
        idx = torch.randint(model.config.vocab_size, (batch, ctx - n), device=self.device)
        return per_token_by_difference(
            lambda: generate(model, idx, n, temperature=0),
            lambda: generate(model, idx, 1, temperature=0), n, self.device,
            a.eager_repeats, a.case_seconds)

    @torch.no_grad()
    def hf_case(self, hf, size, batch, ctx) -> dict:
        a = self.args
        n = min(a.eager_tokens, ctx - 1)
        idx = torch.randint(SIZES[size]["vocab_size"], (batch, ctx - n), device=self.device)
        mask = torch.ones_like(idx)

        def gen(k):
            return lambda: hf.generate(idx, attention_mask=mask, do_sample=False,
                                       max_new_tokens=k, min_new_tokens=k, use_cache=True,
                                       pad_token_id=0)
        return per_token_by_difference(gen(n), gen(1), n, self.device, a.eager_repeats,
                                       a.case_seconds)

    def paired_ratio(self, size: str, batch: int, rounds: int) -> Optional[dict]:
        """SQT / baseline per-token time, engine and eager loop, from alternating rounds so both
        see the same device state; the ratio's spread is over rounds."""
        ctx = self.contexts(size)[-1] if self.contexts(size) else None
        if ctx is None:
            return None
        out = {"size": size, "batch": batch, "context": ctx}
        models = {v: build(size, v, self.device, self.dtype) for v in ("mha", "sqt")}
        new = min(self.args.new_tokens, ctx - 1)
        compiled = size in self.args.compile_sizes
        out["compiled"] = compiled
        engines = {v: DecodeEngine(m, batch, ctx, bucket=self.args.bucket, compile=compiled)
                   for v, m in models.items()}
        runs = {v: greedy_steps(e, ctx - new, new) for v, e in engines.items()}
        ratios, eager_ratios = [], []
        for r in range(rounds):
            t = {v: time_fn(fn, self.device, warmup=1 if r else 3, repeats=3)["median_ms"]
                 for v, fn in runs.items()}
            ratios.append(t["sqt"] / t["mha"])
            if r < self.args.eager_rounds and not self.out_of_time("eager paired round"):
                e = {v: self.eager_case(m, batch, ctx)["median_ms"] for v, m in models.items()}
                eager_ratios.append(e["sqt"] / e["mha"])
        for key, vals in (("engine", ratios), ("eager", eager_ratios)):
            if vals:
                s = summarize(vals)
                out[key] = {"ratio_median": s["median_ms"], "ratio_min": s["min_ms"],
                            "ratio_max": s["max_ms"], "ratio_q1": s["q1_ms"],
                            "ratio_q3": s["q3_ms"], "rounds": len(vals),
                            "sqt_faster_pct": (1 - s["median_ms"]) * 100}
        return out


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    r = Runner(args, device, dtype)
    result = {"benchmark": "decode", "run_record": run_record(device), "method": __doc__,
              "dtype": str(dtype).replace("torch.", ""), "args": vars(args),
              "sizes": {s: SIZES[s] for s in args.sizes}}
    r.bandwidth = copy_bandwidth_gbs(device)
    result["copy_bandwidth_gbs"] = r.bandwidth
    out_path = pathlib.Path(args.out) / (
        "decode_" + datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        + ".json")

    def save():
        result.update(cases=r.rows, skipped=r.skipped)
        atomic_write_json(out_path, result)

    def engine_stage(sizes, first=None):
        """The engine (and, up to --eager-max-context, the eager loop) for every variant, batch
        and context of `sizes`, batch 1 first. `first`, a (batch, context) pair, is measured for
        every variant before anything else, so a time budget never cuts a judged case."""
        order = sorted(((s, b, c) for s in sizes for b in args.batches for c in r.contexts(s)),
                       key=lambda x: (x[1] != 1, x[2], x[1]))
        passes = [[x for x in order if x[1:] == first], [x for x in order if x[1:] != first]]
        for size, cases in ((size, cases) for cases in passes if cases for size in sizes):
            for variant in args.variants:
                model = None
                for s, b, c in cases:
                    if s != size or r.out_of_time(f"engine {size} {variant} b{b} ctx{c}"):
                        continue
                    model = model or build(size, variant, device, dtype)
                    row = r.engine_case(size, variant, model, b, c)
                    if row.get("status") == "ok" and (variant in args.eager_variants or b == 1) \
                            and c <= args.eager_max_context \
                            and not r.out_of_time(f"eager {size} {variant} b{b} ctx{c}"):
                        row["eager"] = r.eager_case(model, b, c)
                    r.rows.append(row)
                    _print_row(row)
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                save()

    # Judged figures first, so a time budget cuts the least important cases: 1. the seed sizes,
    # 2. Hugging Face, 3. SQT vs baseline with spread, 4. the large model's long contexts.
    engine_stage([s for s in args.sizes if s in SEED_SIZES])

    # 2. Hugging Face generate at the same dimensions (GPT-2 is the MHA baseline).
    result["hf"] = []
    try:
        import transformers
        result["hf_version"] = transformers.__version__
    except ImportError:
        result["hf_status"] = "not installed"
    else:
        for size in args.sizes:
            if size not in args.hf_sizes:
                continue
            hf = hf_model(size, device, dtype)
            for b in args.batches:
                for c in r.contexts(size):
                    if c > args.eager_max_context or r.out_of_time(f"hf {size} b{b} ctx{c}"):
                        continue
                    row = {"size": size, "batch": b, "context": c, "hf": r.hf_case(hf, size, b, c)}
                    result["hf"].append(row)
                    print(f"hf      {size:6s} b{b:<3d} ctx{c:<6d} "
                          f"{row['hf']['median_ms'] * 1e3:9.1f} us/token")
            del hf
            save()

    # 3. SQT vs baseline with spread, at batch 1 and 64, at the seed sizes.
    result["sqt_vs_baseline"] = []
    for size in args.sizes:
        if size not in SEED_SIZES:
            continue
        for b in (1, 64):
            if b in args.batches and not r.out_of_time(f"sqt-vs-baseline {size} b{b}"):
                pr = r.paired_ratio(size, b, args.rounds)
                if pr:
                    result["sqt_vs_baseline"].append(pr)
        save()
    # 4. The larger model: the judged batch-64, 4k-context row of every variant first.
    engine_stage([s for s in args.sizes if s not in SEED_SIZES], first=(64, 4096))
    save()
    result["path"] = str(out_path)
    return result


def _print_row(row: dict) -> None:
    head = f"{row['size']:6s} {row['variant']:7s} b{row['batch']:<3d} ctx{row['context']:<6d}"
    if row.get("status") != "ok":
        print(f"engine  {head} {row.get('status')}")
        return
    e = row["engine"]
    line = (f"engine  {head} {e['median_ms'] * 1e3:9.1f} us/token [{e['q1_ms'] * 1e3:.1f}-"
            f"{e['q3_ms'] * 1e3:.1f}] {e['tokens_per_s']:10.0f} tok/s")
    if "bound" in row:
        line += f"  bound {row['bound']['fraction_of_bound'] * 100:5.1f}%"
    if "eager" in row:
        line += f"  eager {row['eager']['median_ms'] * 1e3:9.1f} us/token"
    print(line, flush=True)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _names(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results", help="folder for decode_<time>.json")
    p.add_argument("--device", default=None)
    p.add_argument("--sizes", type=_names, default=list(SIZES))
    p.add_argument("--variants", type=_names, default=list(VARIANTS))
    p.add_argument("--batches", type=_ints, default=[1, 8, 64])
    p.add_argument("--contexts", type=_ints, default=[256, 1024, 4096, 16384])
    p.add_argument("--new-tokens", type=int, default=32, help="engine tokens timed per run")
    p.add_argument("--eager-tokens", type=int, default=16,
                   help="tokens per eager-loop / HF run (per token by difference with 1)")
    p.add_argument("--eager-variants", type=_names, default=["mha", "sqt"],
                   help="variants whose eager loop is timed at every batch (all at batch 1)")
    p.add_argument("--eager-max-context", type=int, default=1024,
                   help="eager loop and HF only up to this context (they are launch-bound)")
    p.add_argument("--hf-sizes", type=_names, default=list(SEED_SIZES))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--eager-repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=7, help="alternating SQT/MHA rounds")
    p.add_argument("--eager-rounds", type=int, default=3)
    p.add_argument("--bucket", type=int, default=256, help="engine cache-view granularity")
    p.add_argument("--compile-sizes", type=_names, default=["small"],
                   help="sizes whose engine step is fused with torch.compile before capture "
                        "(one compile per shape, so only where the criteria need it)")
    p.add_argument("--compile-batches", type=_ints, default=[1],
                   help="batches at which --compile-sizes engines are compiled")
    p.add_argument("--prefill-tokens", type=int, default=1 << 17,
                   help="time prefill where batch x context is at most this")
    p.add_argument("--profile-sizes", type=_names, default=["small", "large"],
                   help="record the kernels of one step for every variant at batch 1")
    p.add_argument("--case-seconds", type=float, default=3.0, help="time cap per measurement")
    p.add_argument("--max-seconds", type=float, default=330.0,
                   help="stop starting new cases after this many seconds")
    args = p.parse_args(argv)
    bad = [s for s in args.sizes if s not in SIZES]
    if bad:
        p.error(f"--sizes {','.join(bad)}: expected some of {','.join(SIZES)}")
    bad = [v for v in args.variants + args.eager_variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants {','.join(bad)}: expected some of {','.join(VARIANTS)}")
    if args.new_tokens < 1 or args.eager_tokens < 2:
        p.error("--new-tokens must be >= 1 and --eager-tokens >= 2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    report_run(result["path"])     # the run's section: every row, the criteria, the reading
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} case(s); see the JSON")
    print(f"wrote {result['path']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
