# Run from the repository root: PYTHONPATH=src:. OUT=<dir> python <this file>
# (1) Does running the causal flex op heaviest-blocks-first (sequence flipped, anti-causal mask)
# shorten the tail at 200k, head dim 16? (2) The paper model at 200k compiled whole, both families.
import json, os, time
import torch
from torch.nn.attention.flex_attention import create_block_mask
from sqt import kernels
from sqt.model import TransformerLM
from bench.common import time_fn, matmul_peak_tflops
from bench.throughput_cases import model_config, sdpa_context
OUT = os.environ["OUT"]; dev = torch.device("cuda")
res = {"rev": os.environ.get("SQT_GIT_REVISION"), "flip": [], "compiled": []}
def save(): json.dump(res, open(f"{OUT}/probe2.json", "w"), indent=1)
res["peak_start"] = matmul_peak_tflops(dev); save()
T = 200000
anti = create_block_mask(lambda b, h, q, k: k >= q, None, None, T, T, device=dev, _compile=True)
flex = kernels._flex_fn(dev)
def rnd(H): return torch.randn(1, H, T, 16, device=dev, dtype=torch.bfloat16)
t0 = time.time()
for H in (16, 4, 16, 4):
    q, k, v = rnd(H), rnd(H), rnd(H)
    with torch.inference_mode():
        ref = kernels.flex_attention(q, k, v)
        fl = lambda: flex(q.flip(2), k.flip(2), v.flip(2), block_mask=anti).flip(2)
        err = (fl().float() - ref.float()).abs().max().item()
        a = time_fn(lambda: kernels.flex_attention(q, k, v), dev, warmup=2, repeats=7)
        b = time_fn(fl, dev, warmup=2, repeats=7)
        c = time_fn(lambda: flex(q, k, v, block_mask=anti), dev, warmup=2, repeats=7)
    rec = {"H": H, "causal_ms": a["median_ms"], "flipped_ms": b["median_ms"], "anti_only_ms": c["median_ms"], "max_abs_diff": err}
    res["flip"].append(rec); save(); print(rec, flush=True)
    del q, k, v, ref
print("flip done", time.time() - t0, flush=True)
for fam in ("flex", "sdpa"):
    for variant in ("mha", "xsqa", "sqa"):
        rec = {"family": fam, "variant": variant, "T": T}
        try:
            cfg = model_config("paper", T, fam).with_layers(variant)
            torch.manual_seed(0)
            model = TransformerLM(cfg).to(dev).eval()
            idx = torch.randint(0, cfg.vocab_size, (1, T), device=dev)
            if fam == "flex": kernels.flex_block_mask(T, None, dev)
            cm = torch.compile(model, dynamic=False)
            ctx = (lambda: sdpa_context("none", dev))
            def fn():
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16), ctx():
                    return cm(idx)
            tc = time.time(); fn(); rec["compile_s"] = time.time() - tc
            st = time_fn(fn, dev, warmup=2, repeats=5); rec.update(st)
            ev = time_fn(lambda: model(idx) if False else None, dev, warmup=0, repeats=1)
            def efn():
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16), ctx():
                    return model(idx)
            rec["eager_median_ms"] = time_fn(efn, dev, warmup=2, repeats=5)["median_ms"]
            del model, cm
        except Exception as e:
            rec["error"] = repr(e)[:400]
        torch.cuda.empty_cache(); res["compiled"].append(rec); save(); print(rec, flush=True)
res["peak_end"] = matmul_peak_tflops(dev); res["elapsed_s"] = time.time() - t0; save()
