"""One attention layer: a query source (projection, static table or static rotary vector), K/V
projections, the head mapping, RoPE, and the KV cache it reads and writes."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from .config import LayerSpec, LMConfig
from .kernels import Offset, attend, resolve_backend


class Rotary(nn.Module):
    """Rotary position embedding, rotate-half convention, computed from the positions themselves
    so it has no length limit (and works for tensor positions inside a captured graph)."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim}: RoPE needs an even head dimension")
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, D); positions: (T,) absolute positions."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]   # (T, D/2)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class KVCache:
    """Preallocated keys and values for every layer, sized by each layer's K/V heads. `length` is
    the number of positions already written; the model advances it after a forward."""

    def __init__(self, cfg: LMConfig, batch_size: int, max_len: int,
                 device=None, dtype: torch.dtype = torch.float32):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"KVCache batch_size={batch_size}, max_len={max_len}: both must be >= 1")
        hd = cfg.head_dim
        self.max_len = max_len
        self.k = [torch.zeros(batch_size, s.n_kv_heads, max_len, hd, device=device, dtype=dtype)
                  for s in cfg.layer_specs()]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, offset: int):
        end = offset + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of max_len={self.max_len} cannot hold position {end - 1}; "
                             "allocate a larger cache")
        self.k[layer][:, :, offset:end] = k
        self.v[layer][:, :, offset:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig, spec: LayerSpec, layer_idx: int):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        bias = cfg.block == "classic"
        self.spec, self.layer_idx, self.head_dim = spec, layer_idx, hd
        self.max_seq_len = cfg.max_seq_len
        # A static query replaces W_q x. It is initialised at the scale a projected query has at
        # init (0.02-std weights times a unit-variance input of width d), so both start alike.
        q_std = 0.02 * math.sqrt(d)
        if spec.query == "table":
            self.q_table = nn.Parameter(torch.randn(cfg.max_seq_len, spec.n_q_heads, hd) * q_std)
        elif spec.query == "rotary":
            self.q_vec = nn.Parameter(torch.randn(spec.n_q_heads, hd) * q_std)
        # Everything computed from x (projected queries, keys, values) comes from one matmul: one
        # kernel instead of three, forward and backward, which is what bounds small models.
        q_width = spec.n_q_heads * hd if spec.query == "proj" else 0
        self.qkv_split = (q_width, spec.n_kv_heads * hd, spec.n_kv_heads * hd)
        self.qkv_proj = nn.Linear(d, sum(self.qkv_split), bias=bias)
        # Reverse SQA produces one output per K/V head, so o_proj is sized by the larger count.
        self.o_proj = nn.Linear(spec.n_attn_heads * hd, d, bias=bias)
        self.rotary = (Rotary(hd, cfg.rope_base)
                       if cfg.block == "modern" or spec.query == "rotary" else None)
        self.requested_backend = cfg.backend
        resolve_backend(cfg.backend, spec.window)  # fail at construction, not at first forward

    def backend_for(self, device: torch.device) -> str:
        """The attention op this layer runs on `device`."""
        return resolve_backend(self.requested_backend, self.spec.window, device.type)

    def queries(self, x: torch.Tensor, offset: Offset = 0,
                projected: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, n_q_heads, T, head_dim) before RoPE. For static sources x only sets the shape;
        `projected` is the query slice of `qkv_proj(x)` when the caller has it already."""
        B, T, _ = x.shape
        nq, hd = self.spec.n_q_heads, self.head_dim
        if self.spec.query == "proj":
            if projected is None:
                projected = self.qkv_proj(x)[..., :self.qkv_split[0]]
            return projected.view(B, T, nq, hd).transpose(1, 2)
        if self.spec.query == "table":
            if isinstance(offset, int):
                if offset + T > self.max_seq_len:
                    raise ValueError(
                        f"sequence reaches position {offset + T - 1} but layer {self.layer_idx} "
                        f"has a static query table of max_seq_len={self.max_seq_len}; inputs "
                        f"(prompt plus generated tokens) must be at most {self.max_seq_len} long")
                q = self.q_table[offset:offset + T]
            else:
                q = self.q_table.index_select(0, offset + torch.arange(T, device=x.device))
            return q.permute(1, 0, 2).unsqueeze(0).expand(B, nq, T, hd).to(x.dtype)
        return self.q_vec[None, :, None, :].expand(B, nq, T, hd).to(x.dtype)

    def forward(self, x: torch.Tensor, offset: Offset = 0,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        B, T, _ = x.shape
        nkv, hd = self.spec.n_kv_heads, self.head_dim
        q_lin, k, v = self.qkv_proj(x).split(self.qkv_split, dim=-1)
        q = self.queries(x, offset, q_lin)
        k = k.view(B, T, nkv, hd).transpose(1, 2)
        v = v.view(B, T, nkv, hd).transpose(1, 2)
        if self.rotary is not None:
            positions = torch.arange(T, device=x.device) + offset
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, offset)
        y = attend(q, k, v, self.backend_for(x.device), offset, self.spec.window)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the projections were fused hold q_proj/k_proj/v_proj; they
        # load as the concatenation, which computes exactly the same function.
        old = [prefix + n + "_proj." for n in ("q", "k", "v")]
        if old[1] + "weight" in state_dict and prefix + "qkv_proj.weight" not in state_dict:
            for kind in ("weight", "bias"):
                parts = [state_dict.pop(o + kind) for o in old if o + kind in state_dict]
                if parts:
                    state_dict[prefix + "qkv_proj." + kind] = torch.cat(parts, dim=0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
