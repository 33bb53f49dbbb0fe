"""Inference latency of one architecture: a full forward at batch 1 x 256 tokens, and the per-token
decode step with the KV cache. Medians after warm-up (CUDA events on GPU, via bench.common)."""

from __future__ import annotations

import torch

from sqt.config import LMConfig
from sqt.engine import DecodeEngine
from sqt.model import TransformerLM

from .common import time_fn
from .engine_steps import seek


@torch.inference_mode()
def measure_latency(cfg: LMConfig, device, seq_len: int = 256, prompt_len: int = 64,
                    decode_tokens: int = 128, repeats: int = 20, warmup: int = 5,
                    compile: bool = False, seed: int = 0) -> dict:
    """Latency depends on the architecture, not on trained weights, so a freshly initialised model
    is timed; that lets the timing run alone on an idle device after all training is done.
    Weights are cast to bfloat16 on CUDA (fp32 on CPU). `compile` compiles the fixed-shape forward
    only."""
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    model = TransformerLM(cfg).to(device=device, dtype=dtype).eval()
    seq_len = min(seq_len, cfg.max_seq_len)
    prompt_len = min(prompt_len, seq_len // 2)
    decode_tokens = min(decode_tokens, cfg.max_seq_len - prompt_len)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(cfg.vocab_size, (1, seq_len), generator=gen).to(device)

    fwd = torch.compile(model, dynamic=False) if compile else model
    forward = time_fn(lambda: fwd(idx), device, warmup=warmup, repeats=repeats, max_seconds=20)

    # Decoding runs on the engine a user would ship (static cache; on CUDA each step replayed as
    # a CUDA graph), so the column measures the architecture, not Python's launch overhead.
    engine = DecodeEngine(model, 1, prompt_len + decode_tokens)
    engine.prefill(idx[:, :prompt_len])
    first = idx[:, prompt_len]

    def decode():
        # Rewinding to the prompt reuses its prefilled keys and values; later positions are
        # overwritten.
        seek(engine, prompt_len)
        tok = first
        for _ in range(decode_tokens):
            tok = engine.step(tok).argmax(-1)   # greedy, stays on the device
        return tok

    dec = time_fn(decode, device, warmup=max(1, warmup // 2), repeats=max(3, repeats // 2),
                  max_seconds=30)
    per_token = {k: v / decode_tokens for k, v in dec.items() if k.endswith("_ms")}
    return {
        "forward_ms": forward["median_ms"], "forward": forward,
        "decode_ms_per_token": per_token["median_ms"], "decode_per_token": per_token,
        "batch": 1, "seq_len": seq_len, "prompt_len": prompt_len, "decode_tokens": decode_tokens,
        "dtype": str(dtype).replace("torch.", ""), "compiled_forward": compile,
        "compiled_decode": False, "decode_engine": "sqt.engine.DecodeEngine",
        "decode_cuda_graphs": engine.use_graphs, "device": str(device),
    }
