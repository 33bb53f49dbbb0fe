# Run from the repository root: PYTHONPATH=src:. OUT=<dir> python <this file>
# Produced bench/results/probes/20261123T1705-flex-tiles-200k/flextune.json (see its README).
# FlexAttention forward tiles at 200k tokens for head dim 16 (the paper model's MHA and xSQA
# shapes), the head-dim-128 op on every kernel and layout, then the whole paper model with the
# best tiles. Results are saved after every measurement.
import json, os, sys, time, traceback
import torch
from sqt import kernels
from bench.common import time_fn, matmul_peak_tflops
from bench.probes.flex import causal_block_mask, compiled_flex
from bench.throughput_cases import build_case

OUT = os.environ["OUT"]
dev = torch.device("cuda")
res = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "rev": os.environ.get("SQT_GIT_REVISION"),
       "ops": [], "ops128": [], "model": []}
def save():
    json.dump(res, open(f"{OUT}/flextune.json", "w"), indent=1)
res["peak_start"] = matmul_peak_tflops(dev); save()
T = 200000
def fl(H, D, T): return 4 * H * D * T * (T + 1) / 2
def rnd(shape):
    return torch.randn(*shape, device=dev, dtype=torch.bfloat16)
CFG = {"default": None,
       "m128n128w4s3": dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3),
       "m128n128w8s3": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
       "m128n64w4s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
       "m64n128w4s3": dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
       "m128n128w4s3tma": dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3, USE_TMA=True)}
def tiles(c): return {"fwd_" + k: v for k, v in c.items()} if c else None
flex, causal = compiled_flex(), causal_block_mask(T, dev)
def op(q, k, v, c):  # the causal flex op with forward tiles c (None: torch's choice)
    return flex(q, k, v, block_mask=causal, kernel_options=tiles(c))
def setd(D, c):  # tiles for the whole model (part C): sqt's per-head-dim setting
    kernels.FLEX_FORWARD_TILES.pop(D, None)
    if c: kernels.FLEX_FORWARD_TILES[D] = tiles(c)
t0 = time.time()
# --- A: op level, head dim 16
for name, c in CFG.items():
    for H in (16, 4):
        q, k, v = rnd((1, H, T, 16)), rnd((1, H, T, 16)), rnd((1, H, T, 16))
        rec = {"cfg": name, "H": H, "D": 16, "T": T}
        try:
            tc = time.time()
            with torch.inference_mode():
                st = time_fn(lambda: op(q, k, v, c), dev, warmup=2, repeats=7)
            rec.update(st, compile_and_time_s=time.time() - tc, tflops=fl(H, 16, T) / st["median_ms"] / 1e9)
        except Exception as e:
            rec["error"] = repr(e)[:300]
        res["ops"].append(rec); save(); print(rec, flush=True)
        del q, k, v
print("A done", time.time() - t0, flush=True)
# --- B: head dim 128 op at 200k (and cuDNN at 131k), 16 heads
from torch.nn.attention import sdpa_kernel, SDPBackend
import torch.nn.functional as F
for Tb in (200000, 131072):
    for layout in ("bhsd", "bshd"):
        mk = (lambda: rnd((1, 16, Tb, 128))) if layout == "bhsd" else (lambda: rnd((1, Tb, 16, 128)).transpose(1, 2))
        q, k, v = mk(), mk(), mk()
        kinds = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)] if Tb == 200000 else [("cudnn", SDPBackend.CUDNN_ATTENTION)]
        for kname, kb in kinds:
            rec = {"kernel": kname, "layout": layout, "T": Tb}
            try:
                with torch.inference_mode(), sdpa_kernel([kb]):
                    st = time_fn(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), dev, warmup=2, repeats=10)
                rec.update(st, tflops=fl(16, 128, Tb) / st["median_ms"] / 1e9)
            except Exception as e:
                rec["error"] = repr(e)[:300]
            res["ops128"].append(rec); save(); print(rec, flush=True)
        if Tb == 200000 and layout == "bhsd":
            for name in ("default", "m128n64w8s3", "m128n128w8s2"):
                c = {"default": None, "m128n64w8s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
                     "m128n128w8s2": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2)}[name]
                rec = {"kernel": "flex-" + name, "layout": layout, "T": Tb}
                try:
                    with torch.inference_mode():
                        st = time_fn(lambda: op(q, k, v, c), dev, warmup=2, repeats=7)
                    rec.update(st, tflops=fl(16, 128, Tb) / st["median_ms"] / 1e9)
                except Exception as e:
                    rec["error"] = repr(e)[:300]
                res["ops128"].append(rec); save(); print(rec, flush=True)
        del q, k, v
res["peak_mid"] = matmul_peak_tflops(dev); save()
print("B done", time.time() - t0, flush=True)
# --- C: whole paper model, forward, flex family, 200k, with the best head-dim-16 tiles
ok = [r for r in res["ops"] if "median_ms" in r]
score = {}
for r in ok: score.setdefault(r["cfg"], {})[r["H"]] = r["median_ms"]
ranked = sorted((n for n, d in score.items() if len(d) == 2 and n != "default"), key=lambda n: score[n][16] + score[n][4])
res["ranked"] = ranked; save()
for name in ["default"] + ranked[:2]:
    setd(16, CFG[name])
    for variant in ("mha", "xsqa", "sqa"):
        rec = {"cfg": name, "variant": variant, "T": T}
        try:
            case = build_case("paper", "forward", "flex", variant, T, 1, dev, "none", 0)
            tc = time.time()
            st = time_fn(case.fn, dev, warmup=2, repeats=5)
            rec.update(st, compile_and_time_s=time.time() - tc)
            del case
        except Exception as e:
            rec["error"] = repr(e)[:300]
        torch.cuda.empty_cache()
        res["model"].append(rec); save(); print(rec, flush=True)
res["peak_end"] = matmul_peak_tflops(dev); res["elapsed_s"] = time.time() - t0; save()
print("C done", time.time() - t0, flush=True)
