"""Peak memory of one attention layer beside a plain unfused implementation of the same layer with
the same weights (separate q, k, v matmuls, RoPE into new tensors, the same attention op): what
sqt's fused projection costs or saves, measured for each model-level throughput case on CUDA."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn

from sqt.attention import Attention
from sqt.config import LMConfig
from sqt.kernels import attend


class UnfusedAttention(nn.Module):
    """`layer` written the plain way: three projections (copies of the fused weight's parts), RoPE
    applied out of place, the same attention op, the layer's own output projection. It computes
    the function of `layer`; only where tensors live differs."""

    def __init__(self, layer: Attention):
        super().__init__()
        self.layer = layer
        parts = layer.qkv_proj.weight.detach().split(layer.qkv_split, dim=0)
        biases = (layer.qkv_proj.bias.detach().split(layer.qkv_split, dim=0)
                  if layer.qkv_proj.bias is not None else (None,) * 3)
        self.projs = nn.ModuleList()
        for w, b in zip(parts, biases):
            proj = nn.Linear(w.shape[1], w.shape[0], bias=b is not None).to(w.device, w.dtype)
            with torch.no_grad():
                proj.weight.copy_(w)
                if b is not None:
                    proj.bias.copy_(b)
            self.projs.append(proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, (B, T, _) = self.layer, x.shape
        spec, hd = layer.spec, layer.head_dim

        def heads(t, n):
            return t.view(B, T, n, hd).transpose(1, 2)
        q_proj, k_proj, v_proj = self.projs
        q = heads(q_proj(x), spec.n_q_heads) if spec.query == "proj" else layer.queries(x)
        k, v = heads(k_proj(x), spec.n_kv_heads), heads(v_proj(x), spec.n_kv_heads)
        if layer.rotary is not None:
            at = torch.arange(T, device=x.device)
            q, k = layer.rotary(q, at), layer.rotary(k, at)
        grad = torch.is_grad_enabled() and x.requires_grad
        backend = layer.backend_for(x.device, seq_len=T, grad=grad)
        y = attend(q, k, v, backend=backend, window=spec.window)
        return layer.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def _peak_above_start_mib(fn: Callable[[], object], device: torch.device) -> float:
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - start) / 2**20


def layer_memory(cfg: LMConfig, batch: int, seq: int, device: torch.device, *, train: bool,
                 context: Callable = contextlib.nullcontext) -> dict:
    """Peak memory in MiB above what was allocated before the call (weights and input) of the
    first layer of `cfg` on a (batch, seq, d_model) input: a forward in inference mode, or with
    `train` a forward and a backward (weights and input requiring gradients). The same bf16
    autocast and fp32 weights as the model cases; `context` is the case's kernel context.
    Each layout runs once before it is measured (lazy workspaces, kernel compiles)."""
    layer = Attention.from_config(cfg, cfg.layer_specs()[0], 0).to(device)
    unfused = UnfusedAttention(layer).to(device)
    x = torch.randn(batch, seq, cfg.d_model, device=device, requires_grad=train)
    params = [p for m in (layer, unfused) for p in m.parameters()]

    def step(module):
        mode = contextlib.nullcontext() if train else torch.inference_mode()
        with mode, torch.autocast(device.type, dtype=torch.bfloat16), context():
            y = module(x)
        if train:
            y.backward(torch.ones_like(y))
        for t in params + [x]:
            t.grad = None
    out = {"pass": "forward+backward" if train else "forward"}
    for name, module in (("sqt", layer), ("unfused", unfused)):
        step(module)
        out[name] = _peak_above_start_mib(lambda: step(module), device)
    return out
