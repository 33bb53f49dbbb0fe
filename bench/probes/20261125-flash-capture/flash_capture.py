"""Why does the compiled + captured training step fail with backend=flash? Isolate."""
import json, os, traceback, time
import torch
OUT = os.environ.get("OUT", "/tmp")
res = {}

def attempt(name, fn):
    t = time.time()
    try:
        res[name] = fn() or "ok"
    except Exception as e:
        res[name] = {"error": f"{type(e).__name__}: {e}"[:1500], "tb": traceback.format_exc()[-2500:]}
    print(name, round(time.time() - t, 1), json.dumps(res[name])[:1500], flush=True)
    json.dump(res, open(f"{OUT}/flash_capture.json", "w"), indent=1)

def raw_capture(op):
    from sqt import flash
    q = torch.randn(4, 256, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(4, 256, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(4, 256, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    def step():
        out, lse = torch.ops.sqt.flash_attn_fwd(q, k, v, 0.125, -1)
        if op == "fwd":
            return out
        dq, dk, dv = torch.ops.sqt.flash_attn_bwd(torch.ones_like(out), q, k, v, out, lse, 0.125, -1)
        return dq
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = step()
    g.replay(); torch.cuda.synchronize()
    return {"replay_eq": bool(torch.equal(y, step()))}

attempt("raw_fwd_capture", lambda: raw_capture("fwd"))
attempt("raw_fwd_bwd_capture", lambda: raw_capture("bwd"))

def trainer(compile_, graph):
    from sqt import LMConfig
    from sqt.data import load_dataset
    from sqt.train import train
    from sqt.runconfig import TrainConfig
    data = load_dataset("tinyshakespeare")
    cfg = LMConfig(vocab_size=data.tokenizer.vocab_size, d_model=256, n_heads=4, n_layers=2,
                   d_ff=512, max_seq_len=256, block="modern", backend="flash")
    r = train(cfg, TrainConfig(steps=30, batch_size=16, seq_len=256, eval_every=30, eval_batches=2,
                               compile=compile_, cuda_graph=graph, progress=False, log=False), data)
    return {k: r.get(k) for k in ("final_val_loss", "ms_per_step", "cuda_graph", "compiled")}

attempt("train_eager_graph", lambda: trainer(False, True))
attempt("train_compiled_nograph", lambda: trainer(True, False))
attempt("train_compiled_graph", lambda: trainer(True, True))
