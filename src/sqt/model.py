"""The language model: blocks (norm, attention, MLP or mixture of experts) stacked from per-layer
specs, and the seed's constructors BaselineLM, SQTLM and HybridLM, which only choose that list of
specs."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import Attention, KVCache
from .config import LayersArg, LMConfig, hybrid_layers, preset
from .moe import MoE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class MLP(nn.Module):
    """GELU MLP (classic block) or SwiGLU (modern block)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.swiglu = cfg.block == "modern"
        bias = not self.swiglu
        # SwiGLU's gate and up projections are one matmul (gate rows first), as Q/K/V are.
        self.up = nn.Linear(cfg.d_model, 2 * cfg.d_ff if self.swiglu else cfg.d_ff, bias=bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=bias)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the fusion hold `gate` and `up` apart.
        if prefix + "gate.weight" in state_dict:
            state_dict[prefix + "up.weight"] = torch.cat(
                [state_dict.pop(prefix + "gate.weight"), state_dict[prefix + "up.weight"]], dim=0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _norm(cfg: LMConfig) -> nn.Module:
    return (nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.block == "classic"
            else RMSNorm(cfg.d_model, cfg.norm_eps))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, spec, layer_idx: int):
        super().__init__()
        self.norm1, self.norm2 = _norm(cfg), _norm(cfg)
        self.attn = Attention(cfg, spec, layer_idx)
        self.mlp = MoE(cfg) if cfg.n_experts else MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, offset=0, cache=None):
        x = x + self.drop(self.attn(self.norm1(x), offset, cache))
        return x + self.drop(self.mlp(self.norm2(x)))


class TransformerLM(nn.Module):
    """A decoder-only LM whose layers each choose their query side. `layers` (one variant for all
    layers, or one per layer) overrides `cfg.layers`; the resolved config is `self.config`."""

    def __init__(self, cfg: LMConfig, layers: Optional[LayersArg] = None):
        super().__init__()
        if not isinstance(cfg, LMConfig):
            raise ValueError(f"cfg={type(cfg).__name__}: expected an LMConfig")
        self.config = cfg = cfg.with_layers(layers) if layers is not None else cfg
        self.specs = cfg.layer_specs()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = (nn.Embedding(cfg.max_seq_len, cfg.d_model)
                        if cfg.block == "classic" else None)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, s, i) for i, s in enumerate(self.specs))
        self.norm_f = _norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.block == "classic")
        self.apply(self._init)
        # GPT-2's scaled init of the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down.weight", "mlp.w_down")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @staticmethod
    def _init(m: nn.Module):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    @classmethod
    def from_preset(cls, name: str, layers: Optional[LayersArg] = None, **overrides):
        return cls(preset(name, **overrides), layers)

    @property
    def max_positions(self) -> Optional[int]:
        """The longest sequence the model can read, or None where nothing limits it (RoPE and no
        static table)."""
        absolute = self.pos_emb is not None or any(s.query == "table" for s in self.specs)
        return self.config.max_seq_len if absolute else None

    def backends(self) -> list[str]:
        """The attention op each layer runs on the model's current device (`sdpa`, `flex` or
        `eager`)."""
        device = self.tok_emb.weight.device
        return [b.attn.backend_for(device) for b in self.blocks]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(self.config, batch_size, max_len, device or p.device, dtype or p.dtype)

    def forward(self, idx: torch.Tensor, cache: Optional[KVCache] = None, *,
                return_aux: bool = False):
        """idx: (B, T) token ids. With a cache, idx continues the cached sequence and the cache
        advances by T. Returns logits (B, T, vocab_size); with `return_aux`, (logits, aux_loss)
        where aux_loss is the sum of the MoE layers' weighted auxiliary losses (0 when dense)."""
        if idx.dim() != 2:
            raise ValueError(f"idx has shape {tuple(idx.shape)}: expected (batch, seq_len)")
        B, T = idx.shape
        if T == 0:
            raise ValueError("idx has seq_len=0: expected at least one token")
        offset = cache.length if cache is not None else 0
        limit = self.max_positions
        # A tensor offset comes from a decode engine that keeps the position on the device so one
        # captured graph replays every step; it checks lengths up front, since comparing here
        # would synchronise with the device (and cannot be captured).
        if limit is not None and isinstance(offset, int) and offset + T > limit:
            raise ValueError(
                f"sequence length {offset + T} exceeds max_seq_len={limit}, the longest this "
                "model can read (learned positions or a static query table)")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            positions = (torch.arange(offset, offset + T, device=idx.device)
                         if isinstance(offset, int) else
                         torch.arange(T, device=idx.device) + offset)
            x = x + self.pos_emb(positions)
        x = self.drop(x)
        recompute = self.config.checkpoint_blocks and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute and cache is None:
                # Dropout masks are replayed exactly: checkpoint restores the RNG state.
                x = checkpoint(block, x, offset, use_reentrant=False)
            else:
                x = block(x, offset, cache)
        if cache is not None:
            cache.length = offset + T
        logits = self.lm_head(self.norm_f(x))
        return (logits, self.aux_loss()) if return_aux else logits

    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]

    def aux_loss(self) -> torch.Tensor:
        """The MoE layers' weighted auxiliary losses of the last forward, summed (fp32)."""
        total = torch.zeros((), device=self.tok_emb.weight.device)
        for moe in self.moe_layers():
            total = total + moe.aux_loss
        return total

    def expert_load(self) -> list[torch.Tensor]:
        """Per MoE layer, the token-slot count of each expert in the last forward: the layers' live
        (n_experts,) int64 buffers on the model's device (copy them to keep; reading them on the
        host is the caller's synchronisation)."""
        return [moe.load for moe in self.moe_layers()]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """See `sqt.generate.generate`."""
        from .generate import generate
        return generate(self, idx, max_new_tokens, **kwargs)


def BaselineLM(cfg: LMConfig) -> TransformerLM:
    """Every layer standard multi-head attention."""
    return TransformerLM(cfg, "mha")


def SQTLM(cfg: LMConfig) -> TransformerLM:
    """Every layer a static query table."""
    return TransformerLM(cfg, "sqt")


def HybridLM(cfg: LMConfig, n_sqt_layers: int) -> TransformerLM:
    """The first `n_sqt_layers` layers SQT, the rest standard."""
    return TransformerLM(cfg, hybrid_layers(cfg.n_layers, n_sqt_layers))
