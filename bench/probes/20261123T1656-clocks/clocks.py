# Run from the repository root: OUT=<dir> python <this file>
# Produced bench/results/clocks/20261123T1656 (see its README).
# Sustained-load check: SM clock and power while the 200k head-dim-128 attention runs, and a
# matmul held for the same time, so the op's % of peak can be read against sustained clocks.
import json, os, subprocess, time, torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
out = os.environ["OUT"]
smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu",
                        "--format=csv,noheader,nounits", "-lms", "100"], stdout=open(f"{out}/smi.csv", "w"))
dev = "cuda"
def timed(fn, n):
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) / 1e3)
    return ts
res = {}
x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16); y = torch.randn_like(x)
mm = lambda: [x @ y for _ in range(20)]
timed(mm, 3)
res["mm_t0"] = time.time(); t = timed(mm, 40); res["mm_t1"] = time.time()
res["mm_tflops"] = [20 * 2 * 8192**3 / s / 1e12 for s in t]
T = 200000; q, k, v = (torch.randn(1, 16, T, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
    at = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    timed(at, 2)
    time.sleep(2)
    res["attn_t0"] = time.time(); t = timed(at, 25); res["attn_t1"] = time.time()
fl = 4 * 16 * 128 * T * (T + 1) / 2
res["attn_tflops"] = [fl / s / 1e12 for s in t]
smi.terminate()
json.dump(res, open(f"{out}/clocks.json", "w"))
import statistics as st
print("matmul TFLOP/s first5/last5/median", [round(v) for v in res["mm_tflops"][:5]], [round(v) for v in res["mm_tflops"][-5:]], round(st.median(res["mm_tflops"])))
print("attn TFLOP/s first5/last5/median", [round(v) for v in res["attn_tflops"][:5]], [round(v) for v in res["attn_tflops"][-5:]], round(st.median(res["attn_tflops"])))
